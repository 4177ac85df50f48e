"""Masked-LM pretraining from packed token stores (``scfm pretrain``; Python: :func:`pretrain_model`)."""

from __future__ import annotations

from .loop import NonFiniteLossError, pretrain_model
from .presets import PRESETS, PretrainOptions

__all__ = ["PRESETS", "NonFiniteLossError", "PretrainOptions", "pretrain_model"]
