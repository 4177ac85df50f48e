"""The match report's count sums (:func:`scfm_fast.tokenizer.counts.count_sums`) against a plain
sequential float64 loop: exact for integer counts (also where float32 per-cell sums would round),
within rounding for fractional ones."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scfm_fast.tokenizer.counts import count_sums


def _loop(indices, data, col_token):
    tot = matched = 0.0
    for j, v in zip(indices.tolist(), data.tolist()):
        tot += float(v)
        if col_token[j] >= 0:
            matched += float(v)
    return tot, matched


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.uint16])
def test_integer_counts_are_exact(dtype):
    rng = np.random.default_rng(1)
    m = sp.random(300, 90, density=0.3, format="csr", random_state=rng)
    m.data = rng.integers(0, 5000, m.nnz).astype(dtype)
    col_token = np.where(rng.random(90) < 0.6, 7, -1).astype(np.int32)
    got = count_sums(m.indptr, m.indices, m.data, col_token=col_token, integer_counts=True)
    assert got == _loop(m.indices, m.data, col_token)


def test_cells_beyond_float32_precision_are_exact():
    # one cell summing past 2**24: float32 accumulation would drop the +1
    data = np.array([1.0] + [3e6] * 9, dtype=np.float32)
    indices = np.arange(10, dtype=np.int32)
    got = count_sums(np.array([0, 10]), indices, data, col_token=np.zeros(10, np.int32), integer_counts=True)
    assert got == (27_000_001.0, 27_000_001.0)


def test_fractional_counts_within_rounding():
    rng = np.random.default_rng(2)
    m = sp.random(200, 50, density=0.4, format="csr", random_state=rng, dtype=np.float32)
    col_token = np.where(rng.random(50) < 0.5, 3, -1).astype(np.int32)
    got = count_sums(m.indptr, m.indices, m.data, col_token=col_token, integer_counts=False)
    np.testing.assert_allclose(got, _loop(m.indices, m.data, col_token), rtol=1e-12)
