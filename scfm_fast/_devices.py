"""Parse user-facing device names (CLI flags) into torch devices, with errors that say what to use."""

from __future__ import annotations

import torch

from ._errors import BackendUnavailableError, UsageError


def parse_device(name: str, *, flag: str) -> torch.device:
    """``name`` (cpu, cuda, cuda:N) as a torch device, checked here rather than deep inside the first batch.

    Raises
    ------
    UsageError
        ``name`` is not a device torch knows.
    BackendUnavailableError
        A CUDA device this machine does not have.
    """
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        msg = f"{flag} {name!r} is not a device; use cpu, cuda or cuda:N"
        raise UsageError(msg) from None
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dev.type == "cuda" and (dev.index or 0) >= n_gpu:
        have = f"cpu or cuda:0..cuda:{n_gpu - 1}" if n_gpu else "cpu (no GPU here)"
        msg = f"{flag} {name!r}: this machine has {n_gpu} usable CUDA device(s); use {have}"
        raise BackendUnavailableError(msg)
    return dev
