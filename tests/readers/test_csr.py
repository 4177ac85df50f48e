"""Dense blocks to CSR: a genes x cells block (loom) converted in place equals the transposed block's CSR."""

from __future__ import annotations

import numpy as np
import pytest

from scfm_fast.readers._csr import dense_columns_to_csr, dense_to_csr


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int32, np.int64, np.uint16, np.bool_])
@pytest.mark.parametrize("shape", [(50, 30), (0, 5), (7, 0), (1, 1), (300, 4000), (3, 40_000)])
def test_columns_to_csr_equals_transposed(dtype, shape):
    """Same indptr, indices (genes ascending in each cell), data and dtypes as ``dense_to_csr(block.T)``;
    NaNs kept as non-zeros; more cells than an int16 holds take the wide sort."""
    rng = np.random.default_rng(sum(shape))
    b = ((rng.random(shape) < 0.1) * rng.integers(1, 9, shape)).astype(dtype)
    if b.dtype.kind == "f" and b.size > 3:
        b.flat[3] = np.nan
        b.flat[b.size - 1] = -2.5
    want = dense_to_csr(5, np.ascontiguousarray(b.T))
    got = dense_columns_to_csr(5, b)
    assert got.start == 5 and got.indptr.dtype == np.int64 and got.indices.dtype == np.int32
    np.testing.assert_array_equal(got.indptr, want.indptr)
    np.testing.assert_array_equal(got.indices, want.indices)
    assert got.data.dtype == want.data.dtype
    np.testing.assert_array_equal(got.data, want.data)


def test_columns_to_csr_of_a_strided_view():
    b = np.arange(60, dtype=np.float32).reshape(6, 10)[:, ::2] % 3
    want = dense_to_csr(0, np.ascontiguousarray(b.T))
    got = dense_columns_to_csr(0, b)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.data, want.data)
    np.testing.assert_array_equal(got.indptr, want.indptr)
