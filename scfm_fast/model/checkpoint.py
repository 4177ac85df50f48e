"""Hugging Face BERT checkpoints <-> :class:`~scfm_fast.model.bert.BertEncoderModel`.

Reads ``config.json`` plus ``model.safetensors`` or ``pytorch_model.bin`` (or their sharded forms,
``*.index.json`` + shards) as written by ``BertForMaskedLM`` (keys prefixed ``bert.``; Geneformer V1/V2,
mouse-Geneformer), ``BertModel`` (bare keys) or a fine-tuned ``BertForSequenceClassification`` /
``BertForTokenClassification``. The MLM head (``cls.predictions.*``, :class:`~scfm_fast.model.heads.MLMHead`),
pooler and classifier are not part of the encoder; ``save_encoder`` can write an MLM head back so that
``transformers.BertForMaskedLM.from_pretrained`` loads the directory.

:func:`load_encoder` picks the loader by the checkpoint's ``config.json`` through
:mod:`scfm_fast.model.registry` (BERT family here; GeneCompass has its own).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .._errors import InputFileError
from .bert import BertEncoderModel
from .config import EncoderConfig
from .heads import MLMHead

# in transformers' order of preference; an *.index.json names the shards of a sharded checkpoint
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_HEAD_PREFIX = "cls.predictions."
# pooler, next-sentence head (BertForPreTraining) and fine-tuned classifiers: not part of the encoder
_IGNORED_PREFIXES = ("cls.", "pooler.", "bert.pooler.", "classifier.")
_IGNORED_SUFFIXES = ("position_ids", "token_type_ids")
# with tie_word_embeddings, BertForMaskedLM ties these to the word embeddings / cls.predictions.bias
_DECODER_WEIGHT, _DECODER_BIAS = "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - safetensors / pickle / zip errors alike mean an unreadable file
        msg = f"{path}: cannot read the weights ({type(e).__name__}: {e}); is the file complete?"
        raise InputFileError(msg) from e


def _read_sharded(index: Path) -> dict[str, torch.Tensor]:
    """Merge the shards that a Hugging Face ``*.index.json`` lists in its ``weight_map``."""
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        msg = f"{index}: not a shard index with a weight_map ({type(e).__name__}: {e})"
        raise InputFileError(msg) from e
    sd: dict[str, torch.Tensor] = {}
    for name in shards:
        if not (index.parent / name).is_file():
            msg = f"{index}: lists shard {name}, which is missing; is the download complete?"
            raise InputFileError(msg)
        sd.update(_read_state_dict(index.parent / name))
    return sd


def read_config_dict(path: str | Path) -> dict[str, Any]:
    """The raw ``config.json`` dict of a checkpoint directory (``InputFileError`` naming what is wrong)."""
    p = Path(path)
    if not p.is_dir():
        msg = f"{p}: not a checkpoint directory (expected config.json + model.safetensors or pytorch_model.bin)"
        raise InputFileError(msg)
    if not (p / "config.json").is_file():
        msg = f"{p}: no config.json; a checkpoint directory holds config.json + model.safetensors or pytorch_model.bin"
        raise InputFileError(msg)
    try:
        d = json.loads((p / "config.json").read_text())
    except ValueError as e:
        msg = f"{p / 'config.json'}: not valid JSON ({e})"
        raise InputFileError(msg) from e
    if not isinstance(d, dict):
        msg = f"{p / 'config.json'}: expected a JSON object, got {type(d).__name__}"
        raise InputFileError(msg)
    return d


def read_checkpoint(path: str | Path) -> tuple[EncoderConfig, dict[str, torch.Tensor], Path]:
    """Config, raw state dict and weight file of a checkpoint directory."""
    p = Path(path)
    try:
        cfg = EncoderConfig.from_dict(read_config_dict(p))
    except (ValueError, TypeError) as e:  # unsupported settings
        msg = f"{p / 'config.json'}: {e}"
        raise InputFileError(msg) from e
    return cfg, *read_weights(p)


def read_weights(p: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """Raw state dict and weight file of a checkpoint directory (the first of ``_WEIGHT_FILES`` present)."""
    for name in _WEIGHT_FILES:
        w = p / name
        if w.exists():
            return _read_sharded(w) if name.endswith(".index.json") else _read_state_dict(w), w
    msg = f"{p}: no weights found; expected one of {list(_WEIGHT_FILES)}"
    raise InputFileError(msg)


def encoder_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split an HF state dict into (encoder weights with bare BertModel names, MLM head weights)."""
    enc, head = {}, {}
    for k, v in sd.items():
        if k.startswith(_HEAD_PREFIX):
            head[k] = v
            continue
        if k.startswith(_IGNORED_PREFIXES) or k.endswith(_IGNORED_SUFFIXES):
            continue
        enc[k.removeprefix("bert.")] = v
    return enc, head


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], wfile: Path, *, what: str,
                     hint: str) -> None:
    """Refuse weights whose names or shapes differ from ``model``'s, naming the file and the keys."""
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or unexpected:
        msg = (f"{wfile}: weights do not match {what} "
               f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
               f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}); {hint}")
        raise InputFileError(msg)
    for k, v in sd.items():
        if tuple(v.shape) != tuple(want[k].shape):
            msg = f"{wfile}: {k} has shape {tuple(v.shape)}, config.json implies {tuple(want[k].shape)}"
            raise InputFileError(msg)


def load_encoder(path: str | Path, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, return_head: bool = False) -> Any:
    """Load a checkpoint's encoder (eval mode), by the family its ``config.json`` names.

    BERT-family checkpoints load as :class:`BertEncoderModel` (:func:`load_bert_encoder`); GeneCompass
    checkpoints as :class:`~scfm_fast.model.genecompass.GeneCompassModel`, through
    :mod:`scfm_fast.model.registry`.

    Parameters
    ----------
    path
        Checkpoint directory (``config.json`` + weights).
    device
        Where to put the model (default: CPU).
    dtype
        Parameter dtype (default: as stored).
    return_head
        Also return the MLM head's tensors: ``(model, head_state_dict)``.

    Returns
    -------
    The model of the checkpoint's family (eval mode), or ``(model, head_state_dict)``.
    """
    from .registry import family_of

    fam = family_of(read_config_dict(path), source=str(Path(path) / "config.json"))
    return fam.load(path, device=device, dtype=dtype, return_head=return_head)


def load_bert_encoder(path: str | Path, *, device: str | torch.device | None = None,
                      dtype: torch.dtype | None = None, return_head: bool = False) -> Any:
    """Load a Hugging Face BERT checkpoint as a :class:`BertEncoderModel` (eval mode).

    Parameters
    ----------
    path
        Checkpoint directory (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``, or a
        sharded ``*.index.json`` with its shards).
    device
        Where to put the model (default: CPU).
    dtype
        Parameter dtype (default: float32; float16/bfloat16 checkpoints are widened, losslessly).
    return_head
        Also return the MLM head weights (``cls.predictions.*``, empty for a checkpoint without one) so
        that :func:`save_encoder` can write them back.

    Returns
    -------
    BertEncoderModel, or (model, head_state_dict) when ``return_head``.
    """
    cfg, sd, wfile = read_checkpoint(path)
    enc, head = encoder_state_dict(sd)
    model = BertEncoderModel(cfg)
    check_state_dict(model, enc, wfile, what="a BERT encoder of this config.json",
                     hint="is this a BERT checkpoint?")
    model.load_state_dict(enc, strict=True)
    model = model.to(device=device or "cpu", dtype=dtype).eval()
    if cfg.tie_word_embeddings:  # copies of tied weights (a pytorch_model.bin holds them); save_encoder re-ties
        head.pop(_DECODER_WEIGHT, None)
        head.pop(_DECODER_BIAS, None)
    return (model, head) if return_head else model


def load_masked_lm(path: str | Path, *, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None) -> tuple[BertEncoderModel, MLMHead]:
    """A BERT checkpoint as (encoder, :class:`MLMHead`), the head tied to the encoder's word embeddings
    unless the checkpoint's decoder is untied (eval mode; call ``.train()`` to train).

    A checkpoint without an MLM head (``BertModel``, a fine-tuned classifier) is refused: training from
    it needs a fresh head, which is the caller's decision.
    """
    model, head_sd = load_bert_encoder(path, device=device, dtype=dtype, return_head=True)
    if not head_sd:
        msg = f"{path}: no MLM head (cls.predictions.*) in this checkpoint"
        raise InputFileError(msg)
    tied = _DECODER_WEIGHT not in head_sd
    head = MLMHead(model.config, tied_to=model.embeddings.word_embeddings if tied else None)
    try:
        head.load_hf_state_dict(head_sd, source=str(path))
    except ValueError as e:
        raise InputFileError(str(e)) from e
    return model, head.to(device=device or "cpu", dtype=dtype).eval()


def save_encoder(model: BertEncoderModel, path: str | Path, *,
                 mlm_head: MLMHead | dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` as a Hugging Face ``BertForMaskedLM`` checkpoint directory (safetensors).

    Parameters
    ----------
    model
        The encoder.
    path
        Output directory (created).
    mlm_head
        An :class:`MLMHead`, or ``cls.predictions.*`` weights (from ``load_encoder(..., return_head=True)``);
        when absent a placeholder head (:meth:`MLMHead.reset_identity`) is written whose decoder is tied to
        the word embeddings, so the directory still loads as ``BertForMaskedLM`` (its MLM predictions are
        then untrained). An untied head (one holding ``cls.predictions.decoder.weight``) is written untied
        (``tie_word_embeddings: false``).

    Returns
    -------
    Path of the directory.
    """
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    sd = {f"bert.{k}": v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if mlm_head is None:
        mlm_head = MLMHead(cfg, tied_to=model.embeddings.word_embeddings).reset_identity()
    if isinstance(mlm_head, MLMHead):
        mlm_head = mlm_head.hf_state_dict()
    for k, v in mlm_head.items():
        # a copy: tensors of a torch.load-ed head may share storage, which safetensors refuses
        sd[k] = v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    hf = cfg.to_hf_dict()
    hf["tie_word_embeddings"] = _DECODER_WEIGHT not in mlm_head
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    return out
