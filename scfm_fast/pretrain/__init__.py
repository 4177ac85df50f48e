"""Masked-LM pretraining from packed token stores (``scfm pretrain``)."""

from __future__ import annotations

import sys
import types

from .loop import NonFiniteLossError, pretrain
from .presets import PRESETS, PretrainOptions

__all__ = ["PRESETS", "NonFiniteLossError", "PretrainOptions", "pretrain"]


class _CallableModule(types.ModuleType):
    """Once imported, ``scfm_fast.pretrain`` is this package, which would shadow the lazily exported
    ``scfm_fast.pretrain(...)`` function; calling the package calls the function instead."""

    def __call__(self, *args, **kwargs):
        return pretrain(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
