"""The one table mapping Hugging Face ``hidden_act`` names to activations.

Used by the encoder layers and the MLM head (``fn``), by the in-place forms the inference paths use on
fresh temporaries (``inplace``) and by the fused Triton kernel (``code`` selects the formula in
:mod:`scfm_fast.kernels.bias_act`). Names are ``transformers.activations.ACT2FN``'s for the functions
Geneformer-family and GeneCompass checkpoints use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Activation:
    """One activation: its torch function, an in-place form (``None``: none exists) and a kernel code."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    inplace: Callable[[torch.Tensor], torch.Tensor] | None
    code: int


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_RELU = Activation(F.relu, torch.relu_, 0)
_GELU = Activation(F.gelu, None, 1)
_GELU_TANH = Activation(_gelu_tanh, None, 2)
_SILU = Activation(F.silu, lambda x: F.silu(x, inplace=True), 3)

ACTIVATIONS: dict[str, Activation] = {
    "relu": _RELU, "gelu": _GELU, "gelu_new": _GELU_TANH, "gelu_pytorch_tanh": _GELU_TANH,
    "silu": _SILU, "swish": _SILU,
}


def get_activation(name: str) -> Activation:
    """The :class:`Activation` for a ``hidden_act`` name; ``ValueError`` naming the supported ones."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        msg = f"unsupported activation {name!r}; use one of {sorted(ACTIVATIONS)}"
        raise ValueError(msg) from None


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The torch function for a ``hidden_act`` name."""
    return get_activation(name).fn
