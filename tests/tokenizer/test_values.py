"""GeneCompass value tokenization: every backend equals the NumPy oracle bit for bit, and the oracle
equals GeneCompass's own definition (dense log2(1 + count / median), sorted by value)."""

from __future__ import annotations

import numpy as np
import pytest

from scfm_fast._errors import CountDataError
from scfm_fast.tokenizer.rank import available_backends
from scfm_fast.tokenizer.reference import value_tokenize_ref
from scfm_fast.tokenizer.values import tokenize_values

BACKENDS = [
    pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))
    for name, reason in available_backends().items()
]
N_TOKENS = 30


def _csr(dense: np.ndarray, dtype=np.float32):
    rows, cols = np.nonzero(dense)
    indptr = np.zeros(dense.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=dense.shape[0]), out=indptr[1:])
    return indptr, cols.astype(np.int32), dense[rows, cols].astype(dtype)


def _case(seed: int = 1, n_cells: int = 25, n_cols: int = 47):
    """Counts with ties (medians from a small set), duplicate and unmapped genes, an empty cell, a
    one-gene cell and a cell expressing every gene."""
    rng = np.random.default_rng(seed)
    dense = rng.integers(0, 5, (n_cells, n_cols)) * (rng.random((n_cells, n_cols)) < 0.4)
    dense[1] = 0
    dense[2] = 0
    dense[2, 5] = 3
    dense[3] = rng.integers(1, 4, n_cols)
    col_token = rng.integers(0, N_TOKENS, n_cols).astype(np.int32)
    col_token[:3] = [7, 7, -1]  # a duplicate gene and an unmapped one
    col_token[5] = 11
    token_median = rng.choice([0.5, 1.0, 2.0, 3.0], N_TOKENS).astype(np.float64)
    return dense.astype(np.float64), col_token, token_median


def _assert_bitwise(out, ref):
    tokens, values, offsets, totals = out
    assert tokens.dtype == np.int32 and values.dtype == np.float32 and offsets.dtype == np.int64
    np.testing.assert_array_equal(offsets, ref[2])
    np.testing.assert_array_equal(tokens, ref[0])
    np.testing.assert_array_equal(values.view(np.int32), ref[1].view(np.int32))
    np.testing.assert_array_equal(totals.view(np.int64), ref[3].view(np.int64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_threads", [1, 3])
@pytest.mark.parametrize("max_len", [1, 4, 2048])
@pytest.mark.parametrize("normalize_total", [None, 10000])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backends_equal_reference(backend, n_threads, max_len, normalize_total, dtype):
    dense, col_token, token_median = _case()
    indptr, indices, data = _csr(dense, dtype)
    kw = dict(col_token=col_token, token_median=token_median, max_len=max_len, normalize_total=normalize_total)
    ref = value_tokenize_ref(indptr, indices, data, **kw)
    out = tokenize_values(indptr, indices, data, backend=backend, n_threads=n_threads, **kw)
    _assert_bitwise(out, ref)
    lengths = np.diff(out[2])
    assert lengths[1] == 0 and lengths[2] == 1 and lengths.max() <= max_len


def _genecompass_definition(dense, col_token, token_median, max_len, normalize_total=None):
    """GeneCompass's script, written out on a dense matrix: sum genes per token, divide by the median
    (and the library-size step when asked), log2(1 + x), keep nonzero genes sorted by value."""
    n_tok = token_median.shape[0]
    per_token = np.zeros((dense.shape[0], n_tok))
    for c, t in enumerate(col_token):
        if t >= 0:
            per_token[:, t] += dense[:, c]
    x = per_token / token_median
    if normalize_total is not None:
        x = x * (normalize_total / dense.sum(axis=1, keepdims=True).clip(min=1))
    value = np.log2(1 + x)
    cells = []
    for row in value:
        ids = np.flatnonzero(row > 0)
        order = ids[np.lexsort((ids, -row[ids]))][:max_len]  # value desc, then our tie rule
        cells.append((order, row[order].astype(np.float32)))
    return cells


@pytest.mark.parametrize("normalize_total", [None, 10000])
def test_reference_is_genecompass_definition(normalize_total):
    dense, col_token, token_median = _case(seed=4)
    indptr, indices, data = _csr(dense)
    tokens, values, offsets, _ = value_tokenize_ref(
        indptr, indices, data, col_token=col_token, token_median=token_median, max_len=9,
        normalize_total=normalize_total,
    )
    expected = _genecompass_definition(dense, col_token, token_median, 9, normalize_total)
    for i, (ids, vals) in enumerate(expected):
        got_ids = tokens[offsets[i]:offsets[i + 1]]
        np.testing.assert_array_equal(got_ids, ids)
        # np.log2 may differ from the C library's log2 in the last float64 bit
        np.testing.assert_allclose(values[offsets[i]:offsets[i + 1]], vals, rtol=1e-6)
    assert np.all(np.diff(values[offsets[0]:offsets[1]]) <= 0)


def test_ties_broken_by_token_id_and_values_nonincreasing():
    # four genes with the same count and median: ids ascending; a higher one first
    dense = np.array([[2.0, 2.0, 2.0, 2.0, 8.0]])
    col_token = np.array([9, 3, 6, 1, 4], dtype=np.int32)
    token_median = np.ones(10)
    for backend in [p.values[0] for p in BACKENDS if not p.marks]:
        tokens, values, _, _ = tokenize_values(*_csr(dense), col_token=col_token, token_median=token_median,
                                               max_len=3, backend=backend)
        np.testing.assert_array_equal(tokens, [4, 1, 3])
        np.testing.assert_array_equal(values, np.float32([np.log2(9.0), np.log2(3.0), np.log2(3.0)]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_counts_and_arguments_refused(backend):
    dense, col_token, token_median = _case()
    indptr, indices, data = _csr(dense)
    data = data.copy()
    data[4] = -1.0
    with pytest.raises(CountDataError, match="negative count"):
        tokenize_values(indptr, indices, data, col_token=col_token, token_median=token_median, backend=backend)
    with pytest.raises(ValueError, match="normalize_total"):
        tokenize_values(*_csr(dense), col_token=col_token, token_median=token_median, normalize_total=0,
                        backend=backend)
    bad_idx = indices.copy()
    bad_idx[3] = 999
    with pytest.raises(ValueError, match="gene column index 999"):
        tokenize_values(indptr, bad_idx, _csr(dense)[2], col_token=col_token, token_median=token_median,
                        backend=backend)


def test_empty_chunk():
    for backend in [p.values[0] for p in BACKENDS if not p.marks]:
        tokens, values, offsets, _ = tokenize_values(
            np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32),
            col_token=np.zeros(3, np.int32), token_median=np.ones(3), backend=backend,
        )
        assert tokens.size == 0 and values.size == 0 and offsets.tolist() == [0]


@pytest.mark.skipif(available_backends()["cpp"] is not None, reason="C++ core not built")
def test_core_refuses_tokens_not_from_the_row():
    from scfm_fast import _ext

    dense, col_token, token_median = _case()
    indptr, indices, data = _csr(dense)
    absent = sorted(set(range(N_TOKENS)) - set(col_token[dense[0] > 0].tolist()))[0]
    tokens = np.array([absent], dtype=np.int32)  # cell 0 holds one token that is not in its row
    offsets = np.array([0, 1] + [1] * (dense.shape[0] - 1), dtype=np.int64)
    with pytest.raises(ValueError, match="cell row 0"):
        _ext.core.token_values(indptr, indices, data, col_token, token_median, tokens, offsets, None, 1)
