"""What a run is made of: the datasets' vocabulary, the model + MLM head, optimiser and schedule."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._errors import InputFileError, UsageError
from ..model.bert import BertEncoderModel
from ..model.config import EncoderConfig
from ..model.heads import MLMHead
from ..store.reader import read_manifest
from .presets import PRESETS, PretrainOptions

_HEAD = "cls.predictions."


def dataset_vocab(paths: Sequence[str | Path], *, token_dictionary: str | None) -> tuple[int, dict[str, int], str]:
    """(vocabulary size, special tokens, dictionary sha256) shared by all ``paths``.

    The size is that of the token dictionary the data were tokenized with: ``token_dictionary`` (checked
    against the manifests' hash) or the preset's bundled dictionary when the hashes match.
    """
    from ..vocab.dictionaries import (
        bundled_dir,
        check_token_dictionary,
        file_sha256,
        get_preset,
        load_pickle_dict,
    )

    if not paths:
        msg = "no TOKENS_DIR given"
        raise UsageError(msg)
    cfgs = [read_manifest(p).get("config", {}) for p in paths]
    hashes = {c.get("dictionary_hashes", {}).get("token_dictionary") for c in cfgs}
    specials = [c.get("special_tokens") for c in cfgs]
    if len(hashes) > 1 or any(s != specials[0] for s in specials):
        msg = (f"{list(map(str, paths))}: the datasets were tokenized with different token dictionaries or special "
               "tokens; pretrain on datasets that share one dictionary")
        raise UsageError(msg)
    recorded = hashes.pop()
    if not specials[0] or "<mask>" not in specials[0] or "<pad>" not in specials[0]:
        msg = f"{paths[0]}: the manifest records no <pad>/<mask> special tokens; re-tokenize with scfm tokenize"
        raise UsageError(msg)
    if token_dictionary is None:
        try:
            pre = get_preset(cfgs[0].get("preset", "geneformer-v1"))
            cand = bundled_dir(pre.dictionary_dir) / "token_dictionary.pkl" if pre.dictionary_dir else None
        except ValueError:
            cand = None
        if cand is None or not cand.exists() or file_sha256(cand) != recorded:
            msg = (f"{paths[0]}: tokenized with a token dictionary scfm_fast does not bundle (sha256 "
                   f"{str(recorded)[:12]}…); pass --token-dictionary PKL (the one given to scfm tokenize) so the "
                   "model's vocabulary size is known")
            raise InputFileError(msg)
        token_dictionary = str(cand)
    check_token_dictionary(token_dictionary, recorded, dataset=str(paths[0]))
    d = load_pickle_dict(token_dictionary, what="token dictionary")
    return max(int(v) for v in d.values()) + 1, {k: int(v) for k, v in specials[0].items()}, str(recorded)


def model_config(opts: PretrainOptions, *, vocab_size: int, specials: dict[str, int]) -> EncoderConfig:
    """The encoder config from ``--preset``, ``--config`` or ``--init``; refused if its vocabulary differs."""
    if opts.init is not None:
        cfg = EncoderConfig.from_json(opts.init)
        src = f"--init {opts.init}"
    elif opts.config is not None:
        try:
            raw = json.loads(Path(opts.config).read_text())
            # a config without vocab_size / pad_token_id takes the dataset's
            raw = {"vocab_size": vocab_size, "pad_token_id": specials["<pad>"], **raw}
            cfg = EncoderConfig.from_dict(raw)
        except (OSError, ValueError, TypeError) as e:
            msg = f"{opts.config}: {e}"
            raise InputFileError(msg) from e
        src = f"--config {opts.config}"
    else:
        d = dict(PRESETS[opts.preset]["model"], vocab_size=vocab_size, pad_token_id=specials["<pad>"])
        cfg = EncoderConfig(**d)
        src = f"--preset {opts.preset}"
    if cfg.vocab_size != vocab_size:
        msg = (f"{src}: the model's vocabulary has {cfg.vocab_size} tokens but the dataset's token dictionary has "
               f"{vocab_size}; use a model made for this dictionary (or --preset, which takes the dataset's size)")
        raise UsageError(msg)
    if cfg.pad_token_id != specials["<pad>"]:
        msg = f"{src}: pad_token_id {cfg.pad_token_id} differs from the dataset's <pad> id {specials['<pad>']}"
        raise UsageError(msg)
    if opts.dropout is not None:
        cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = float(opts.dropout)
    return cfg


def build_model(cfg: EncoderConfig, *, init: str | None) -> tuple[BertEncoderModel, MLMHead]:
    """A fresh model (BERT initialisation, as ``BertForMaskedLM``) or one loaded from ``init``."""
    model = BertEncoderModel(cfg)
    _bert_init(model, cfg)
    head = MLMHead(cfg, tied_to=model.embeddings.word_embeddings)
    _bert_init(head, cfg)
    if init is not None:
        load_weights(model, head, init)
    return model, head


def load_weights(model: BertEncoderModel, head: MLMHead, path: str | Path) -> None:
    """Load encoder (and, when present, MLM head) weights of a Hugging Face checkpoint in place
    (a GeneCompass model: its own checkpoint layout, heads included)."""
    from ..model.checkpoint import load_encoder

    if hasattr(model, "gcfg"):
        from ..model.genecompass_checkpoint import load_genecompass

        model.load_state_dict(load_genecompass(path).state_dict())
        return

    enc, head_sd = load_encoder(path, return_head=True)
    model.load_state_dict(enc.state_dict())
    if head_sd:  # an encoder saved without a head keeps the fresh one
        head.load_hf_state_dict(head_sd, source=str(path))


@torch.no_grad()
def _bert_init(module: torch.nn.Module, cfg: EncoderConfig) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.Linear | torch.nn.Embedding):
            m.weight.normal_(0.0, cfg.initializer_range)
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.zero_()
            if isinstance(m, torch.nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, torch.nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()


def make_optimizer(model: BertEncoderModel, head: MLMHead, opts: PretrainOptions,
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW without weight decay on biases and LayerNorm weights; fused where supported, else foreach."""
    seen: dict[int, tuple[str, torch.nn.Parameter]] = {}
    for prefix, mod in (("bert.", model), (_HEAD, head)):
        for n, p in mod.named_parameters():
            seen.setdefault(id(p), (prefix + n, p))
    decay = [p for n, p in seen.values() if not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in seen.values() if n.endswith("bias") or "LayerNorm" in n]
    groups: list[dict[str, Any]] = [{"params": decay, "weight_decay": opts.weight_decay},
                                    {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=opts.lr, fused=True)
    except (RuntimeError, TypeError):  # fused kernels absent for this device / dtype
        return torch.optim.AdamW(groups, lr=opts.lr, foreach=True)


def make_scheduler(optimizer: torch.optim.Optimizer, opts: PretrainOptions,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then linear or cosine decay to 0 at ``total_steps`` (Hugging Face's schedules)."""
    warm = int(round(opts.warmup * total_steps)) if opts.warmup < 1 else int(opts.warmup)

    def factor(step: int) -> float:
        if step < warm:
            return step / max(1, warm)
        prog = (step - warm) / max(1, total_steps - warm)
        if opts.schedule == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * prog)))
        return max(0.0, 1.0 - prog)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
