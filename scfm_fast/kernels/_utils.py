"""Shared kernel plumbing: when Triton kernels run, block sizes, contiguity."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import TypeVar

import torch

log = logging.getLogger("scfm_fast")
T = TypeVar("T")

# kernels that failed to compile or launch on this device in this process: name -> reason
FAILED_KERNELS: dict[str, str] = {}


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


@functools.lru_cache(maxsize=1)
def _triton_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = []
    for mod, name in (("triton.errors", "TritonError"), ("triton.compiler.errors", "CompilationError"),
                      ("triton.runtime.errors", "OutOfResources"), ("triton.runtime.errors", "PTXASError")):
        try:
            errs.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errs)


def run_kernel(name: str, fast: Callable[[], T], fallback: Callable[[], T]) -> T:
    """Run a Triton kernel launch ``fast``; if Triton cannot compile it for this device (a compiler,
    resource or assembler error), warn once, use the PyTorch ``fallback`` for this kernel from then on.

    Only Triton's own errors are caught: wrong inputs and CUDA errors still raise. ``SCFM_FAST_TRITON_STRICT=1``
    (set by the test suite) raises instead, so a kernel that does not build on a GPU fails its tests.
    """
    if name in FAILED_KERNELS:
        return fallback()
    try:
        return fast()
    except _triton_errors() as e:
        if os.environ.get("SCFM_FAST_TRITON_STRICT", "0") == "1":
            raise
        FAILED_KERNELS[name] = f"{type(e).__name__}: {str(e)[:500]}"
        log.warning("Triton kernel %s failed to build on this device (%s); using PyTorch ops for it. "
                    "Please report this with `scfm info` output.", name, FAILED_KERNELS[name])
        return fallback()


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def row_block(n: int) -> tuple[int, int]:
    """BLOCK and num_warps for a kernel that holds one row of ``n`` elements."""
    block = max(next_pow2(n), 16)
    warps = 1 if block <= 256 else 4 if block <= 2048 else 8
    return block, warps
