"""Every rank-tokenization backend must match the NumPy oracle bit for bit (tokens, offsets, totals)
and raise the same errors, on synthetic chunks built to hit the awkward cases."""

from __future__ import annotations

import numpy as np
import pytest

from scfm_fast._errors import BackendUnavailableError, CountDataError
from scfm_fast.tokenizer.rank import available_backends, tokenize_rank
from scfm_fast.tokenizer.reference import rank_tokenize_ref
from tests.tokenizer._same_error import same_count_error

FAST = [
    pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))
    for name, reason in available_backends().items()
    if name != "reference"
]
N_TOKENS = 40


def _assert_same(out, ref):
    tokens, offsets, totals = out
    r_tokens, r_offsets, r_totals = ref
    assert tokens.dtype == np.int32 and offsets.dtype == np.int64 and totals.dtype == np.float64
    np.testing.assert_array_equal(offsets, r_offsets)
    np.testing.assert_array_equal(tokens, r_tokens)
    # bitwise: catches -0.0 vs 0.0 and NaN payload differences, not just value equality
    np.testing.assert_array_equal(totals.view(np.int64), np.asarray(r_totals, np.float64).view(np.int64))


def _vocab(rng, n_cols):
    """col_token with duplicates and unmapped columns; medians from a small set, so keys tie."""
    col_token = rng.integers(0, N_TOKENS, n_cols).astype(np.int32)
    col_token[rng.random(n_cols) < 0.2] = -1
    col_token[:4] = [3, 3, 3, -1]  # a triple duplicate gene
    token_median = rng.choice([0.5, 1.0, 2.0, 4.0, 0.3], N_TOKENS).astype(np.float64)
    return col_token, token_median


def _chunk(rng, n_cells, n_cols, *, dtype=np.float32, integer=True, idx_dtype=np.int32, ptr_dtype=np.int64):
    """Random CSR with explicit zeros, an empty cell, a one-gene cell and a full (long) cell."""
    rows_cols, rows_vals = [], []
    for i in range(n_cells):
        if i == 1:
            nnz = 0
        elif i == 2:
            nnz = 1
        elif i == 3:
            nnz = n_cols
        else:
            nnz = int(rng.integers(0, n_cols))
        cols = np.sort(rng.choice(n_cols, nnz, replace=False))
        vals = rng.integers(0, 6, nnz).astype(np.float64)  # 0 = explicit zero
        if not integer:
            vals = vals * rng.choice([1.0, 0.5, 0.1, 1 / 3], nnz)
        if i == 2:
            vals[:] = 2.0
            cols[:] = 0  # the duplicate-gene column: in vocabulary
        rows_cols.append(cols)
        rows_vals.append(vals)
    indptr = np.zeros(n_cells + 1, dtype=ptr_dtype)
    np.cumsum([c.size for c in rows_cols], out=indptr[1:])
    indices = np.concatenate(rows_cols).astype(idx_dtype) if n_cells else np.zeros(0, idx_dtype)
    data = np.concatenate(rows_vals).astype(dtype) if n_cells else np.zeros(0, dtype)
    return indptr, indices, data


def _both(backend, indptr, indices, data, **kw):
    n_threads = kw.pop("n_threads", None)
    ref = rank_tokenize_ref(indptr, indices, data, **kw)
    out = tokenize_rank(indptr, indices, data, backend=backend, n_threads=n_threads, **kw)
    return out, ref


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize(
    ("max_len", "cls_token", "eos_token"),
    [(7, -1, -1), (7, 0, 1), (8, 5, -1), (1, -1, -1), (2048, 0, 1)],
    ids=["short", "short-cls-eos", "short-cls", "one", "long-cls-eos"],
)
@pytest.mark.parametrize("with_totals", [False, True], ids=["row-sum", "given-totals"])
def test_matches_reference(backend, dtype, n_threads, max_len, cls_token, eos_token, with_totals):
    rng = np.random.default_rng(7)
    n_cols = 61  # prime
    col_token, token_median = _vocab(rng, n_cols)
    indptr, indices, data = _chunk(rng, 37, n_cols, dtype=dtype)
    totals = rng.choice([0.0, 100.0, np.nan, -1.0, 5e3], 37) if with_totals else None
    out, ref = _both(
        backend,
        indptr,
        indices,
        data,
        col_token=col_token,
        token_median=token_median,
        max_len=max_len,
        cls_token=cls_token,
        eos_token=eos_token,
        totals=totals,
        n_threads=n_threads,
    )
    _assert_same(out, ref)
    lengths = np.diff(out[1])
    assert lengths[1] == 0 and lengths.max() <= max_len  # empty cell, truncation


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize(
    ("idx_dtype", "ptr_dtype"), [(np.int32, np.int32), (np.int64, np.int64), (np.int64, np.int32)]
)
@pytest.mark.parametrize("n_threads", [1, 2])
def test_fractional_counts_and_index_dtypes(backend, idx_dtype, ptr_dtype, n_threads):
    rng = np.random.default_rng(3)
    col_token, token_median = _vocab(rng, 53)
    indptr, indices, data = _chunk(
        rng, 29, 53, dtype=np.float64, integer=False, idx_dtype=idx_dtype, ptr_dtype=ptr_dtype
    )
    out, ref = _both(
        backend,
        indptr,
        indices,
        data,
        col_token=col_token,
        token_median=token_median,
        max_len=9,
        allow_non_integer=True,
        n_threads=n_threads,
    )
    _assert_same(out, ref)


@pytest.mark.parametrize("backend", FAST)
def test_many_cells_many_threads(backend):
    # long cells exercise the bucket sort (>= 64 genes) and its crowded-bucket fallback (few medians)
    rng = np.random.default_rng(11)
    n_cols = 900
    col_token = rng.permutation(n_cols).astype(np.int32) % 700
    col_token[rng.random(n_cols) < 0.1] = -1
    for token_median in (rng.lognormal(0, 1.5, 700), rng.choice([1.0, 2.0, 3.0], 700)):
        indptr, indices, data = _chunk(rng, 64, n_cols, dtype=np.float32)
        for n_threads in (1, 2, 5):
            for max_len, cls_token, eos_token in ((2048, -1, -1), (100, 1, 2)):
                out, ref = _both(
                    backend,
                    indptr,
                    indices,
                    data,
                    col_token=col_token,
                    token_median=token_median,
                    max_len=max_len,
                    cls_token=cls_token,
                    eos_token=eos_token,
                    n_threads=n_threads,
                )
                _assert_same(out, ref)


@pytest.mark.parametrize("backend", FAST)
def test_long_runs_of_equal_keys(backend):
    # thousands of genes with one key: only the token order decides (the C++ radix sort's insertion
    # pass gives up on such runs and falls back to introsort)
    rng = np.random.default_rng(2)
    n_cols = 3000
    col_token = rng.permutation(n_cols).astype(np.int32)
    data = rng.choice([1.0, 1.0, 1.0, 2.0], n_cols)
    indptr = np.array([0, n_cols, 2 * n_cols], dtype=np.int64)
    indices = np.concatenate([np.arange(n_cols), rng.permutation(n_cols)]).astype(np.int32)
    for token_median in (np.ones(n_cols), rng.choice([1.0, 2.0], n_cols)):
        for max_len in (2048, 4096):
            out, ref = _both(
                backend,
                indptr,
                indices,
                np.concatenate([data, data]),
                col_token=col_token,
                token_median=token_median,
                max_len=max_len,
                n_threads=2,
            )
            _assert_same(out, ref)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
def test_odd_medians_and_signed_zero(backend):
    # median 0 -> +inf key, inf -> 0 key (dropped), NaN -> NaN key (ranked last, ties by token),
    # negative -> negative key; a cell holding only -0.0 has total -0.0 and no tokens
    token_median = np.array([1.0, 0.0, np.inf, np.nan, -2.0, np.nan, 0.0, 3.0, 1e-300, 1e300])
    col_token = np.arange(10, dtype=np.int32)
    indptr = np.array([0, 10, 11, 13, 13], dtype=np.int64)
    indices = np.array(list(range(10)) + [3] + [0, 1], dtype=np.int32)
    data = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, -0.0, -0.0, 0.0], dtype=np.float64)
    for n_threads in (1, 2):
        out, ref = _both(
            backend,
            indptr,
            indices,
            data,
            col_token=col_token,
            token_median=token_median,
            max_len=20,
            n_threads=n_threads,
        )
        _assert_same(out, ref)


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_sums_are_sequential(backend):
    # above 2**53 the order of additions matters: 1e16 + 1 rounds back to 1e16 at every step of a
    # left-to-right sum (the final + 3 gives 1e16 + 4), while NumPy's pairwise np.sum gives 1e16 + 12
    col_token = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], dtype=np.int32)
    token_median = np.array([1.0, 1.0])
    data = np.array([1e16] + [1.0] * 9 + [3.0])
    indptr = np.array([0, 11], dtype=np.int64)
    tokens, offsets, totals = tokenize_rank(
        indptr,
        np.arange(11, dtype=np.int32),
        data,
        col_token=col_token,
        token_median=token_median,
        max_len=4,
        backend=backend,
    )
    expected = data[0]
    for v in data[1:]:  # (Python's sum() is compensated from 3.12 on)
        expected = expected + v
    assert totals[0] == expected == 1e16 + 4 != float(np.sum(data))
    assert tokens.tolist() == [0, 1]


@pytest.mark.parametrize("backend", FAST)
def test_empty_chunk_and_all_empty_cells(backend):
    col_token = np.array([0, 1], dtype=np.int32)
    token_median = np.ones(2)
    for indptr in (np.zeros(1, np.int64), np.zeros(4, np.int64)):
        out, ref = _both(
            backend,
            indptr,
            np.zeros(0, np.int32),
            np.zeros(0, np.float32),
            col_token=col_token,
            token_median=token_median,
            max_len=4,
            cls_token=0,
            n_threads=2,
        )
        _assert_same(out, ref)


@pytest.mark.parametrize("backend", FAST)
def test_slice_of_larger_csr(backend):
    # indptr taken from the middle of a bigger matrix (not starting at 0), data/indices whole
    rng = np.random.default_rng(5)
    col_token, token_median = _vocab(rng, 31)
    indptr, indices, data = _chunk(rng, 20, 31)
    sub = indptr[5:12]
    out, ref = _both(
        backend, sub, indices, data, col_token=col_token, token_median=token_median, max_len=6, n_threads=2
    )
    _assert_same(out, ref)


@pytest.mark.parametrize("backend", FAST)
def test_integer_data(backend):
    rng = np.random.default_rng(9)
    col_token, token_median = _vocab(rng, 31)
    indptr, indices, data = _chunk(rng, 12, 31, dtype=np.float64)
    out, ref = _both(
        backend,
        indptr,
        indices,
        data.astype(np.int32),
        col_token=col_token,
        token_median=token_median,
        max_len=6,
        n_threads=2,
    )
    _assert_same(out, ref)


@pytest.mark.parametrize("backend", FAST)
def test_scratch_reuse_across_calls(backend):
    # the C++ core keeps its per-token accumulator between calls: neither a smaller vocabulary whose
    # unmapped-gene sink slot is a real token of the next call, nor a call that stopped on a bad count
    # mid-cell, may leak into later results
    rng = np.random.default_rng(4)
    col_token, token_median = _vocab(rng, 23)
    col_token[:4] = [0, 1, 2, 3]  # token 2 is the sink of the small call below
    chunk = _chunk(rng, 9, 23)
    kw = dict(col_token=col_token, token_median=token_median, max_len=30)
    indptr, indices = np.array([0, 4], dtype=np.int64), np.array([0, 1, 2, 3], dtype=np.int32)
    small = dict(col_token=np.array([0, 1, -1, -1], dtype=np.int32), token_median=np.ones(2), max_len=4)
    nan_row = np.array([5.0, 6.0, 7.0, np.nan])
    for step in range(3):
        out, ref = _both(backend, *chunk, n_threads=1, **kw)
        _assert_same(out, ref)
        if step == 0:
            tokenize_rank(
                indptr, indices, np.array([5.0, 6.0, 7.0, 8.0]), backend=backend, n_threads=1, **small
            )
        elif step == 1:
            with pytest.raises(CountDataError):
                tokenize_rank(indptr, indices, nan_row, backend=backend, n_threads=1, **kw)


# ---------------------------------------------------------------- errors


def _error_chunk():
    rng = np.random.default_rng(1)
    col_token, token_median = _vocab(rng, 41)
    indptr, indices, data = _chunk(rng, 48, 41, dtype=np.float64)
    return indptr, indices, data, col_token, token_median


BAD_VALUES = [np.nan, np.inf, -np.inf, -1.0, 2.5]


@pytest.mark.parametrize("backend", ["reference", *FAST])
@pytest.mark.parametrize("bad", BAD_VALUES, ids=["nan", "inf", "-inf", "negative", "fraction"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_bad_counts_same_error(backend, bad, dtype, n_threads):
    indptr, indices, data, col_token, token_median = _error_chunk()
    data = data.astype(dtype)
    late = int(indptr[40])  # in the second thread's half: the earlier entry must still win
    early = int(indptr[7]) + 1
    data[late] = -3.0
    data[early] = bad
    msg = same_count_error(indptr, indices, data, backend=backend, n_threads=n_threads, col_token=col_token,
                           token_median=token_median, max_len=5)
    assert "cell row 7 " in msg


@pytest.mark.parametrize("backend", FAST)
def test_fraction_allowed(backend):
    indptr, indices, data, col_token, token_median = _error_chunk()
    data[int(indptr[7]) + 1] = 2.5
    out, ref = _both(
        backend,
        indptr,
        indices,
        data,
        col_token=col_token,
        token_median=token_median,
        max_len=5,
        allow_non_integer=True,
        n_threads=2,
    )
    _assert_same(out, ref)
    data[int(indptr[9])] = np.nan  # still refused when fractions are allowed
    same_count_error(indptr, indices, data, backend=backend, n_threads=2, col_token=col_token,
                     token_median=token_median, max_len=5, allow_non_integer=True)


@pytest.mark.parametrize("backend", ["reference", *FAST])
@pytest.mark.parametrize(("max_len", "cls_token", "eos_token"), [(2, 0, 1), (1, 0, -1), (0, -1, -1)])
def test_max_len_too_small(backend, max_len, cls_token, eos_token):
    indptr, indices, data, col_token, token_median = _error_chunk()
    kw = dict(
        col_token=col_token,
        token_median=token_median,
        max_len=max_len,
        cls_token=cls_token,
        eos_token=eos_token,
    )
    with pytest.raises(ValueError) as want:
        rank_tokenize_ref(indptr, indices, data, **kw)
    with pytest.raises(ValueError) as got:
        tokenize_rank(indptr, indices, data, backend=backend, **kw)
    assert str(got.value) == str(want.value)
    data[3] = np.nan  # bad counts are reported before max_len, as in the oracle
    with pytest.raises(CountDataError):
        tokenize_rank(indptr, indices, data, backend=backend, **kw)


@pytest.mark.parametrize("bad_col", [41, 1000, -1])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_bad_index_same_error_on_every_backend(bad_col, n_threads):
    indptr, indices, data, col_token, token_median = _error_chunk()
    indices = indices.copy()
    indices[int(indptr[29]) + 2] = bad_col
    indices[int(indptr[44])] = bad_col  # a later one, in another thread's range
    kw = dict(col_token=col_token, token_median=token_median, max_len=5, n_threads=n_threads)
    messages = set()
    for backend, reason in available_backends().items():
        if reason is None:
            with pytest.raises(ValueError, match="cell row 29 ") as got:
                tokenize_rank(indptr, indices, data, backend=backend, **kw)
            assert not isinstance(got.value, CountDataError)
            messages.add(str(got.value))
    assert len(messages) == 1
    # a bad count anywhere (even later) takes precedence, as the oracle checks counts first
    data = data.copy()
    data[int(indptr[46])] = -1.0
    for backend, reason in available_backends().items():
        if reason is None:
            with pytest.raises(CountDataError, match="cell row 46 "):
                tokenize_rank(indptr, indices, data, backend=backend, **kw)


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_argument_checks_name_the_argument(backend):
    indptr, indices, data, col_token, token_median = _error_chunk()
    kw = dict(col_token=col_token, token_median=token_median, max_len=5, backend=backend)
    with pytest.raises(ValueError, match="indices and data"):
        tokenize_rank(indptr, indices[:-1], data, **kw)
    with pytest.raises(ValueError, match="indptr"):
        tokenize_rank(indptr[::-1].copy(), indices, data, **kw)
    with pytest.raises(TypeError, match="indices"):
        tokenize_rank(indptr, indices.astype(np.float64), data, **kw)
    with pytest.raises(ValueError, match="totals"):
        tokenize_rank(indptr, indices, data, totals=np.ones(3), **kw)
    with pytest.raises(ValueError, match="col_token"):
        tokenize_rank(indptr, indices, data, **{**kw, "col_token": col_token + N_TOKENS})
    with pytest.raises(ValueError, match="data"):
        tokenize_rank(indptr, indices, data.reshape(1, -1), **kw)


def test_backend_choice(monkeypatch):
    from scfm_fast import _ext
    from scfm_fast.tokenizer import rank

    assert set(available_backends()) == {"cpp", "numba", "reference"}
    assert available_backends()["reference"] is None
    indptr, indices, data, col_token, token_median = _error_chunk()
    kw = dict(col_token=col_token, token_median=token_median, max_len=5)
    with pytest.raises(ValueError, match="backend"):
        tokenize_rank(indptr, indices, data, backend="gpu", **kw)
    ref = rank_tokenize_ref(indptr, indices, data, **kw)
    # simulate a missing extension: cpp refuses with the rebuild hint, auto falls back with one warning
    monkeypatch.setattr(_ext, "core", None)
    monkeypatch.setattr(_ext, "core_error", "ImportError: simulated")
    monkeypatch.setattr(_ext, "_warned_fallback", False)
    with pytest.raises(BackendUnavailableError, match=r"simulated.*pip install -e \."):
        tokenize_rank(indptr, indices, data, backend="cpp", **kw)
    assert available_backends()["cpp"] is not None
    with pytest.warns(RuntimeWarning, match="C\\+\\+ core is unavailable"):
        out = tokenize_rank(indptr, indices, data, backend="auto", **kw)
    _assert_same(out, ref)
    if rank._load_numba() is None:
        pytest.skip("numba is not installed: the warn-once check needs the numba fallback")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once already: silent now
        _assert_same(tokenize_rank(indptr, indices, data, backend="auto", **kw), ref)


@pytest.mark.parametrize("backend", FAST)
def test_sort_sizes_around_the_radix_digit_switch(backend):
    # the C++ sort takes introsort below 192 genes, 8-bit radix digits below 2048 and 11-bit digits
    # above; near-equal keys (medians one ulp apart, equal counts) collide in every digest width
    rng = np.random.default_rng(7)
    n_cols = 6000
    col_token = rng.permutation(n_cols).astype(np.int32)
    token_median = np.where(rng.random(n_cols) < 0.5, rng.lognormal(0, 2, n_cols),
                            np.nextafter(1.0, rng.choice([0.0, 2.0], n_cols)))
    sizes = [191, 192, 193, 2047, 2048, 2049, 5999]
    indptr = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=indptr[1:])
    indices = np.concatenate([np.sort(rng.choice(n_cols, n, replace=False)) for n in sizes]).astype(np.int32)
    data = rng.choice([1.0, 1.0, 2.0, 3.0, 250.0], indices.size).astype(np.float32)
    for max_len in (100, 2048, 8000):
        out, ref = _both(backend, indptr, indices, data, col_token=col_token, token_median=token_median,
                         max_len=max_len, n_threads=2)
        _assert_same(out, ref)
