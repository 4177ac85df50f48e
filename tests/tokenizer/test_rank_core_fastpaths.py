"""Edges of the compiled core's fast paths: the vectorized per-row count/index check that lets the
gather loop skip per-entry tests, and the key pass that drops repeats, zero sums and zero keys.
Every backend must still match the NumPy oracle bit for bit and raise its errors."""

from __future__ import annotations

import numpy as np
import pytest

from scfm_fast.tokenizer.rank import available_backends, tokenize_rank
from scfm_fast.tokenizer.reference import rank_tokenize_ref
from tests.tokenizer._same_error import same_count_error

# the per-row check and the gathers run both ways: scalar and AVX-512 (where the CPU has it)
pytestmark = pytest.mark.usefixtures("gather_simd")

FAST = [
    pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))
    for name, reason in available_backends().items()
    if name != "reference"
]

# Values at the limits of the "(v + 2^m) - 2^m == v" integer test (m = 23 for float32, 52 for
# float64): the largest non-integers, the first values that are always integers, signed zero.
EDGE_OK = {
    np.float32: [2.0**23, 2.0**23 + 2, 2.0**24, 2.0**23 - 1, 3e38, -0.0, 1.0],
    np.float64: [2.0**52, 2.0**52 + 1, 2.0**53, 2.0**52 - 1, 1e300, -0.0, 1.0],
}
EDGE_BAD = {
    np.float32: [2.0**23 - 0.5, 2.0**22 + 0.5, 0.5, 1.0 + 2.0**-23, float(np.finfo(np.float32).tiny)],
    np.float64: [2.0**52 - 0.5, 2.0**51 + 0.5, 0.5, 1.0 + 2.0**-52, 5e-324],
}


def _csr(values, dtype, n_cols=6):
    """One cell per value, each with the value plus a plain count, over n_cols columns."""
    indptr = np.arange(0, 2 * len(values) + 1, 2, dtype=np.int64)
    indices = np.tile(np.array([1, 4], dtype=np.int32), len(values))
    data = np.empty(2 * len(values), dtype=dtype)
    data[0::2] = values
    data[1::2] = 3.0
    col_token = np.array([-1, 0, 1, 2, 3, -1], dtype=np.int32)[:n_cols]
    token_median = np.array([1.0, 2.0, 0.5, 3.0])
    return indptr, indices, data, col_token, token_median


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_integer_check_edges_accepted(backend, dtype, n_threads):
    indptr, indices, data, col_token, token_median = _csr(EDGE_OK[dtype], dtype)
    kw = dict(col_token=col_token, token_median=token_median, max_len=4, cls_token=7)
    ref = rank_tokenize_ref(indptr, indices, data, **kw)
    out = tokenize_rank(indptr, indices, data, backend=backend, n_threads=n_threads, **kw)
    for a, b in zip(out, ref):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_integer_check_edges_rejected(backend, dtype, n_threads):
    for bad in EDGE_BAD[dtype]:
        values = [1.0] * 5 + [bad] + [2.0] * 4
        indptr, indices, data, col_token, token_median = _csr(values, dtype)
        assert data[10] != np.floor(data[10])  # really a fraction in this dtype
        kw = dict(col_token=col_token, token_median=token_median, max_len=4)
        assert "cell row 5 " in same_count_error(indptr, indices, data, backend=backend, n_threads=n_threads, **kw)
        # allowed fractions take the same fast path and still match the oracle
        kw["allow_non_integer"] = True
        ref = rank_tokenize_ref(indptr, indices, data, **kw)
        out = tokenize_rank(indptr, indices, data, backend=backend, n_threads=n_threads, **kw)
        for a, b in zip(out, ref):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("n_threads", [1, 2])
def test_repeats_zero_sums_and_zero_keys(backend, n_threads):
    # columns 0-2 are one token (explicit zero first, then counts), column 3 a token whose median is
    # infinite (key 0: dropped), column 4 a tiny count over a huge median (key underflows to 0),
    # column 5 a token seen only with explicit zeros.
    col_token = np.array([0, 0, 0, 1, 2, 3, 4, -1], dtype=np.int32)
    token_median = np.array([2.0, np.inf, 1e308, 1.0, 0.5])
    rows = [
        ([0, 1, 2, 3, 4, 5, 6, 7], [0, 2, 5, 9, 1, 0, 4, 8]),
        ([3, 4], [7, 1]),  # only zero keys: an empty cell
        ([5, 0], [0, 0]),  # only zero counts
        ([2, 6, 1, 3], [1, 1, 1, 1]),
    ]
    indptr = np.cumsum([0] + [len(c) for c, _ in rows]).astype(np.int64)
    indices = np.concatenate([c for c, _ in rows]).astype(np.int32)
    data = np.concatenate([v for _, v in rows]).astype(np.float64)
    data[4] = 5e-324  # smallest subnormal: not an integer, so allow fractions
    kw = dict(
        col_token=col_token,
        token_median=token_median,
        max_len=6,
        cls_token=9,
        eos_token=8,
        allow_non_integer=True,
    )
    ref = rank_tokenize_ref(indptr, indices, data, **kw)
    out = tokenize_rank(indptr, indices, data, backend=backend, n_threads=n_threads, **kw)
    for a, b in zip(out, ref):
        np.testing.assert_array_equal(a, b)
    assert list(out[0][out[1][0] : out[1][1]]) == [9, 4, 0, 8]  # token 4: 4 / 0.5, token 0: (0+2+5) / 2


def _pbmc_like(rng, n_cells=300, n_cols=500):
    """Random integer CSR, some cells longer than the budget; every column mapped, no repeats."""
    nnz = rng.integers(0, n_cols, n_cells)
    nnz[:3] = [0, n_cols, 1]
    indptr = np.concatenate([[0], np.cumsum(nnz)]).astype(np.int64)
    indices = np.concatenate([np.sort(rng.choice(n_cols, k, replace=False)) for k in nnz]).astype(np.int32)
    data = rng.integers(1, 30, indptr[-1]).astype(np.float32)
    col_token = rng.permutation(n_cols).astype(np.int32)
    token_median = rng.choice([0.5, 1.0, 2.0, 3.0], n_cols)
    return indptr, indices, data, col_token, token_median


@pytest.mark.parametrize("n_threads", [1, 2])
def test_out_buffer_reused(n_threads):
    pytest.importorskip("scfm_fast._core")
    from scfm_fast.tokenizer.rank import rank_output_bound

    rng = np.random.default_rng(5)
    kw = dict(max_len=200, cls_token=501, eos_token=502, backend="cpp", n_threads=n_threads)
    first = _pbmc_like(rng)
    second = _pbmc_like(rng, n_cells=250)
    bound = rank_output_bound(first[0], max_len=200, n_special=2)
    buf = np.full(bound, -7, dtype=np.int32)
    for indptr, indices, data, col_token, token_median in (first, second):
        k = dict(kw, col_token=col_token, token_median=token_median)
        fresh = tokenize_rank(indptr, indices, data, **k)
        ref = rank_tokenize_ref(
            indptr,
            indices,
            data,
            col_token=col_token,
            token_median=token_median,
            max_len=200,
            cls_token=501,
            eos_token=502,
        )
        got = tokenize_rank(indptr, indices, data, out=buf, **k)
        assert np.shares_memory(got[0], buf) and got[0].base is not None
        for a, b, c in zip(got, fresh, ref):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, c)
    # all columns mapped, no repeats: the bound is exact for the first chunk
    assert (
        rank_output_bound(first[0], max_len=200, n_special=2)
        == tokenize_rank(
            *first[:3],
            col_token=first[3],
            token_median=first[4],
            max_len=200,
            cls_token=501,
            eos_token=502,
            backend="cpp",
        )[0].shape[0]
    )
    # too small: a fresh array, the buffer untouched
    small = np.full(bound - 1, -7, dtype=np.int32)
    got = tokenize_rank(*first[:3], col_token=first[3], token_median=first[4], out=small, **kw)
    assert not np.shares_memory(got[0], small) and (small == -7).all()


def test_out_buffer_checked():
    indptr, indices, data, col_token, token_median = _csr([1.0, 2.0], np.float32)
    kw = dict(col_token=col_token, token_median=token_median, max_len=4)
    with pytest.raises(TypeError, match="out must be a 1-D int32"):
        tokenize_rank(indptr, indices, data, out=np.zeros(10, np.int64), **kw)
    ro = np.zeros(10, np.int32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out must be C-contiguous and writeable"):
        tokenize_rank(indptr, indices, data, out=ro, **kw)
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        tokenize_rank(indptr, indices, data, out=np.zeros(20, np.int32)[::2], **kw)
