"""The BERT masked-LM head with Hugging Face parameter names (``cls.predictions.*``)."""

from __future__ import annotations

import torch
from torch import nn

from .bert import activation_fn
from .config import EncoderConfig


class _Transform(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.act = activation_fn(cfg.hidden_act)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(h)))


class MLMHead(nn.Module):
    """``transform`` (dense -> activation -> LayerNorm) then the decoder (tied to the word embeddings).

    Parameter names relative to ``cls.predictions.``: ``transform.dense``, ``transform.LayerNorm``,
    ``decoder`` (no bias; its weight is ``tied_to.weight`` when tied) and ``bias``.
    """

    def __init__(self, cfg: EncoderConfig, *, tied_to: nn.Embedding | None = None) -> None:
        super().__init__()
        self.transform = _Transform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if tied_to is not None:
            self.decoder.weight = tied_to.weight
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.transform(h) @ self.decoder.weight.T + self.bias
