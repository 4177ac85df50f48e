"""The masked-LM head of BERT (``BertOnlyMLMHead``), with Hugging Face parameter names.

``transform.dense -> act -> transform.LayerNorm``, then the decoder (tied to the word embeddings, or its
own weight) plus ``bias``. Its state dict under the prefix ``cls.predictions.`` is exactly what
``transformers.BertForMaskedLM`` saves and loads. Training computes it on the masked rows only
(``rows=``), or takes :meth:`MLMHead.transform` and :attr:`MLMHead.decoder_weight` for a chunked
linear + cross-entropy that never holds ``[rows x vocab]`` logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.activations import get_activation
from .config import EncoderConfig

HF_PREFIX = "cls.predictions."
_DECODER_WEIGHT, _DECODER_BIAS = "decoder.weight", "decoder.bias"


class _Transform(nn.Module):
    """``LayerNorm(act(dense(h)))`` (HF ``BertPredictionHeadTransform``)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.act = get_activation(cfg.hidden_act).fn

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(h)))


class MLMHead(nn.Module):
    """BERT's MLM head; parameter names as in ``BertForMaskedLM.cls.predictions``.

    Parameters
    ----------
    cfg
        The encoder's config (``hidden_act`` and ``layer_norm_eps`` as for the encoder, as in HF).
    tied_to
        Tie the decoder to these word embeddings (an ``nn.Embedding`` or its ``(vocab, hidden)`` weight;
        HF's default, ``tie_word_embeddings``); ``None``: an own decoder weight.
    """

    def __init__(self, cfg: EncoderConfig, *, tied_to: nn.Embedding | nn.Parameter | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.transform = _Transform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.tied = tied_to is not None
        if tied_to is not None:
            w = tied_to.weight if isinstance(tied_to, nn.Embedding) else tied_to
            if tuple(w.shape) != (cfg.vocab_size, cfg.hidden_size):
                msg = (f"cannot tie the MLM decoder ({cfg.vocab_size} x {cfg.hidden_size}) to word embeddings "
                       f"of shape {tuple(w.shape)}")
                raise ValueError(msg)
            self.decoder.weight = w  # one Parameter shared, as HF ties them

    @property
    def decoder_weight(self) -> torch.Tensor:
        """``(vocab, hidden)`` decoder weight (the word embeddings when tied)."""
        return self.decoder.weight

    def transform_rows(self, h: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``LayerNorm(act(dense(h)))`` of ``h`` (or of ``h[rows]``): the decoder's input."""
        return self.transform(h if rows is None else h[rows])

    def forward(self, h: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(..., vocab)`` of ``h``, or of ``h[rows]`` only (index or boolean mask)."""
        return F.linear(self.transform_rows(h, rows), self.decoder.weight, self.bias)

    # ------------------------------------------------------------------ Hugging Face state dicts
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """``cls.predictions.*`` tensors as ``BertForMaskedLM`` saves them (no decoder weight when tied)."""
        out = {}
        for k, v in self.state_dict().items():
            if k == _DECODER_WEIGHT and self.tied:
                continue
            out[HF_PREFIX + k] = v
        if not self.tied:  # transformers >= 5 ties decoder.bias to bias only with tied embeddings
            out[HF_PREFIX + _DECODER_BIAS] = self.bias.detach()
        return out

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor], *, source: str = "checkpoint") -> None:
        """Load ``cls.predictions.*`` tensors (other keys ignored); ``ValueError`` naming what is missing
        or of the wrong shape.

        ``decoder.bias`` is the bias HF's forward adds: a tied alias of ``bias`` in transformers 4 and in
        tied models, its own tensor in an untied transformers-5 model (where ``bias`` goes unused). It wins.
        """
        own = {k.removeprefix(HF_PREFIX): v for k, v in sd.items() if k.startswith(HF_PREFIX)}
        if _DECODER_BIAS in own:
            own["bias"] = own.pop(_DECODER_BIAS)
        if self.tied:
            own.pop(_DECODER_WEIGHT, None)  # a copy of the word embeddings (pytorch_model.bin keeps it)
        want = {k: v for k, v in self.state_dict().items() if not (self.tied and k == _DECODER_WEIGHT)}
        missing = sorted(set(want) - set(own))
        if missing:
            msg = f"{source}: MLM head lacks {[HF_PREFIX + k for k in missing]}"
            raise ValueError(msg)
        for k, v in want.items():
            if tuple(own[k].shape) != tuple(v.shape):
                msg = f"{source}: {HF_PREFIX}{k} has shape {tuple(own[k].shape)}, the config implies {tuple(v.shape)}"
                raise ValueError(msg)
        with torch.no_grad():
            for k, v in want.items():
                v.copy_(own[k])

    def reset_identity(self) -> MLMHead:
        """Identity transform, zero bias: a placeholder head whose predictions are ``LayerNorm(act(h)) E^T``
        (what :func:`~scfm_fast.model.checkpoint.save_encoder` writes for an encoder without a head)."""
        h = self.config.hidden_size
        with torch.no_grad():
            self.transform.dense.weight.copy_(torch.eye(h))
            self.transform.dense.bias.zero_()
            self.transform.LayerNorm.weight.fill_(1.0)
            self.transform.LayerNorm.bias.zero_()
            self.bias.zero_()
        return self
