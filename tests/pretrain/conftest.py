"""Pretraining tests run the encoder's PyTorch ops (what a CPU runs), not Triton's CPU interpreter: the
interpreted kernels are tested under tests/kernels, and would make every training step here minutes long."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_triton_interpreter(monkeypatch):
    monkeypatch.setenv("SCFM_FAST_TRITON", "0")  # subprocesses (torchrun, the CLI) inherit it
