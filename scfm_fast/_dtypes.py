"""Parse user-facing dtype names (CLI flags, keyword options) into torch dtypes."""

from __future__ import annotations

from typing import Any

import torch

_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: Any) -> torch.dtype | None:
    """``None`` / a torch dtype / one of float32, bfloat16, float16 (or fp32, bf16, fp16)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in _NAMES:
        msg = f"dtype={dtype!r}; use float32, bfloat16 or float16"
        raise ValueError(msg)
    return _NAMES[str(dtype)]
