"""Shared kernel plumbing: when Triton kernels run, block sizes, contiguity."""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def triton_available() -> str | None:
    """``None`` when Triton can be imported, else the reason."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure disables the Triton kernels
        return f"triton not importable ({type(e).__name__}: {e})"
    return None


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): kernels run on CPU tensors, slowly."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether to run the Triton kernel for a tensor: on CUDA, or on the CPU under the interpreter.

    ``SCFM_FAST_TRITON=0`` forces the PyTorch reference ops everywhere (debugging).
    """
    if os.environ.get("SCFM_FAST_TRITON", "1") == "0" or triton_available() is not None:
        return False
    return t.is_cuda or (interpreting() and t.device.type == "cpu")


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def row_block(n: int) -> tuple[int, int]:
    """BLOCK and num_warps for a kernel that holds one row of ``n`` elements."""
    block = max(next_pow2(n), 16)
    warps = 1 if block <= 256 else 4 if block <= 2048 else 8
    return block, warps
