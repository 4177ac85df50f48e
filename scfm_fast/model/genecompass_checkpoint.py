"""GeneCompass checkpoints (``config.json`` + ``pytorch_model.bin``) <-> :class:`GeneCompassModel`.

The layout is the one GeneCompass's own ``BertForMaskedLM.save_pretrained`` writes: the four knowledge
tables, ``homologous_index`` and ``position_ids`` under ``bert.embeddings.``, the species rows as
``bert.cls_embedding.weight``, ``cls.predictions.*`` (with copies of the tied decoder weight and bias) and
``cls4value.predictions.*``, and ``emb_warmup.alpha`` / ``.steps`` at the top level. Its ``config.json``
is a BERT config plus the ``use_*`` switches that tell it from a Geneformer checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .._errors import InputFileError
from .checkpoint import check_state_dict, read_config_dict, read_weights
from .genecompass import GC_FLAGS, KNOWLEDGE, GeneCompassConfig, GeneCompassModel
from .registry import is_genecompass_config  # the registry's detector, re-exported

# copies GeneCompass's save_pretrained writes for tied tensors; rebuilt from their sources on save
_TIED = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
         "cls.predictions.decoder.bias": "cls.predictions.bias",
         "cls4value.predictions.decoder.bias": "cls4value.predictions.bias"}


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    d = read_config_dict(path)
    if not is_genecompass_config(d):
        msg = f"{path / 'config.json'}: no GeneCompass keys ({', '.join(GC_FLAGS)}); is this a Geneformer checkpoint?"
        raise InputFileError(msg)
    return d, *read_weights(path)


def load_genecompass(path: str | Path, *, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None,
                     token_dictionary: str | Path | Mapping[str, int] | None = None,
                     return_head: bool = False) -> Any:
    """Load a GeneCompass checkpoint directory as a :class:`GeneCompassModel` (eval mode).

    Parameters
    ----------
    path
        Directory with GeneCompass's ``config.json`` and ``pytorch_model.bin`` (or safetensors).
    device
        Where to put the model (default: CPU).
    dtype
        Floating dtype of parameters and knowledge tables (default: as stored, float32).
    token_dictionary
        Optional token dictionary (a ``.pkl`` path or a mapping) to check against the vocabulary; see
        :func:`check_token_dictionary`.
    return_head
        Return ``(model, {})``, the registry's loader contract: a GeneCompass model holds its MLM and value
        heads as modules, so there is no separate head state dict.

    Raises
    ------
    InputFileError
        Missing / unreadable files, weights that do not match ``config.json``, or a dictionary of another size.
    """
    p = Path(path)
    if not p.is_dir():
        msg = f"{p}: not a checkpoint directory (expected config.json + pytorch_model.bin)"
        raise InputFileError(msg)
    d, sd, wfile = _read(p)
    kdims = {sd[f"bert.embeddings.{k}_knowledge"].shape[1] for k in KNOWLEDGE if f"bert.embeddings.{k}_knowledge" in sd}
    if len(kdims) > 1:
        msg = f"{wfile}: the knowledge tables have different widths {sorted(kdims)}"
        raise InputFileError(msg)
    try:
        gcfg = GeneCompassConfig.from_dict(d, knowledge_dim=kdims.pop() if kdims else 768)
    except (ValueError, TypeError) as e:
        msg = f"{p / 'config.json'}: {e}"
        raise InputFileError(msg) from e
    model = GeneCompassModel(gcfg)
    got = {k: v for k, v in sd.items() if k not in _TIED}
    check_state_dict(model, got, wfile, what="the GeneCompass model its config.json describes",
                     hint="check the use_* switches in config.json")
    hi = got.get("bert.embeddings.homologous_index")
    if hi is not None and hi.numel() and (int(hi.min()) < 0 or int(hi.max()) >= gcfg.encoder.vocab_size):
        msg = f"{wfile}: bert.embeddings.homologous_index points outside the vocabulary of {gcfg.encoder.vocab_size}"
        raise InputFileError(msg)
    model.load_state_dict(got, strict=True)
    model = model.to(device=device or "cpu", dtype=dtype).eval()
    if token_dictionary is not None:
        check_token_dictionary(model, token_dictionary)
    return (model, {}) if return_head else model


def check_token_dictionary(model: GeneCompassModel, token_dictionary: str | Path | Mapping[str, int]) -> None:
    """Refuse a token dictionary whose size differs from the checkpoint's vocabulary (word-embedding rows).

    GeneCompass's repository holds older dictionary versions of other sizes; with one of those every id
    would name another gene without any error.
    """
    where = "the token dictionary"
    if not isinstance(token_dictionary, Mapping):
        where = str(token_dictionary)
        try:
            with open(token_dictionary, "rb") as f:
                token_dictionary = pickle.load(f)  # noqa: S301 - a user-given dictionary file, as Geneformer's
        except (OSError, pickle.UnpicklingError, EOFError) as e:
            msg = f"{where}: cannot read the token dictionary ({type(e).__name__}: {e})"
            raise InputFileError(msg) from e
    n, v = len(token_dictionary), model.config.vocab_size
    if n != v:
        msg = (f"{where} has {n} entries but the checkpoint's vocabulary has {v} word-embedding rows; "
               "use the token dictionary the checkpoint was trained with")
        raise InputFileError(msg)


def save_genecompass(model: GeneCompassModel, path: str | Path) -> Path:
    """Write ``model`` in GeneCompass's layout (``config.json`` + ``pytorch_model.bin``); returns the directory.

    Each file is written to a temporary name and renamed, so a crash never leaves a half-written file.
    The tied copies (decoder weight and biases) are written as GeneCompass's own ``save_pretrained`` does.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    for copy, src in _TIED.items():
        if src in sd:
            sd[copy] = sd[src].clone()
    _atomic(out / "pytorch_model.bin", lambda f: torch.save(sd, f))
    text = json.dumps(model.gcfg.to_dict(), indent=2, sort_keys=True).encode()
    _atomic(out / "config.json", lambda f: f.write(text))
    return out


def _atomic(dest: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
