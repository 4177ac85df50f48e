"""Fixtures of the tokenizer tests: the rank core's gathers, one at a time."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["scalar", "avx512"])
def gather_simd(request):
    """Runs a test once with the core's scalar gathers and once with the AVX-512 ones (skipped where
    the CPU lacks AVX-512), restoring the process's setting afterwards."""
    core = pytest.importorskip("scfm_fast._core")
    was_on = core.build_info()["avx512_gather"] == "on"
    want = request.param == "avx512"
    if core.set_gather_simd(want) != want:
        core.set_gather_simd(was_on)
        pytest.skip("this CPU has no AVX-512 F/DQ/VL/BW: only the scalar gather runs here")
    yield request.param
    core.set_gather_simd(was_on)
