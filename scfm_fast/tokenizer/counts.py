"""Geneformer's ``keep_counts`` column: each token's normalised count, in the cell's rank order."""

from __future__ import annotations

import numpy as np

#: Geneformer's normalisation target (counts per 10,000)
TARGET_SUM = 10_000.0
#: float32 sums of non-negative integers are exact while every partial sum stays below 2**24
_F32_EXACT = float(1 << 24)


def count_sums(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, *, col_token: np.ndarray,
               integer_counts: bool) -> tuple[float, float]:
    """Total counts and counts on vocabulary genes of a CSR chunk (the match report's sums).

    NumPy's sum for the total and one sparse matrix-vector product (scipy's C++ kernel, which releases
    the GIL) for the matched counts, instead of a Numba kernel: importing numba and loading its cached
    kernel cost ~2 CPU seconds per run, more than the sums themselves over a 20,000-cell input. The
    per-cell matched sums run in float32 for float32 data: exact when the counts are integers
    (``integer_counts``: the core has checked them) and every cell's sum stays below 2**24 (partial
    sums of non-negative counts never exceed the final one), otherwise they are redone in float64.
    Integer counts give exactly the sequential float64 sums; fractional ones may differ in the last bit.

    Parameters
    ----------
    indptr, indices, data
        The chunk's CSR arrays (non-negative counts, as the core accepted them).
    col_token
        Token id per source column, negative outside the vocabulary.
    integer_counts
        Whether every count is known to be an integer.

    Returns
    -------
    tuple of float
        ``(total, matched)``.
    """
    from scipy.sparse import _sparsetools  # imported by the readers already

    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int32)
    n_rows, n_cols = indptr.size - 1, col_token.size
    in_vocab = col_token >= 0

    def matched_rows(vals: np.ndarray) -> np.ndarray:
        out = np.zeros(n_rows, dtype=vals.dtype)
        _sparsetools.csr_matvec(n_rows, n_cols, indptr, indices, vals, in_vocab.astype(vals.dtype), out)
        return out

    data = np.asarray(data)
    if data.dtype != np.float32:
        data = data.astype(np.float64, copy=False)
    matched = matched_rows(data)
    if data.dtype == np.float32 and not (integer_counts and matched.max(initial=0.0) < _F32_EXACT):
        matched = matched_rows(data.astype(np.float64))
    return float(data.sum(dtype=np.float64)), float(matched.sum(dtype=np.float64))


def ranked_counts(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, *, col_token: np.ndarray,
                  tokens: np.ndarray, offsets: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """``count / total * 10,000`` for every emitted token, aligned with ``tokens``.

    ``count`` is the cell's raw count of the token's gene, the columns of one gene summed in column
    order (as the ranking sums them); special tokens (``<cls>``/``<eos>``) get ``0.0``, as in Geneformer.

    Parameters
    ----------
    indptr, indices, data
        The chunk's CSR arrays, as given to the core.
    col_token
        Token id per source column, negative outside the vocabulary.
    tokens, offsets, totals
        The core's output for the chunk (``totals``: the total each cell was normalised by).

    Returns
    -------
    numpy.ndarray
        float64, one value per entry of ``tokens``.
    """
    n_cells = offsets.size - 1
    counts = np.diff(np.asarray(indptr, dtype=np.int64))
    rows = np.repeat(np.arange(n_cells, dtype=np.int64), counts)
    tok = col_token[np.asarray(indices)]
    keep = (tok >= 0) & (np.asarray(data) != 0)
    width = np.int64(max(int(col_token.max(initial=0)), int(tokens.max(initial=0))) + 1)
    keys = rows[keep] * width + tok[keep]
    vals = np.asarray(data)[keep].astype(np.float64)
    order = np.argsort(keys, kind="stable")  # stable: a gene's columns are summed in column order
    keys, vals = keys[order], vals[order]
    if keys.size:
        first = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        keys, vals = keys[first], np.add.reduceat(vals, first)
    out_rows = np.repeat(np.arange(n_cells, dtype=np.int64), np.diff(offsets))
    want = out_rows * width + tokens
    pos = np.minimum(np.searchsorted(keys, want), max(keys.size - 1, 0))
    found = keys[pos] == want if keys.size else np.zeros(want.size, dtype=bool)
    cell_total = np.asarray(totals, dtype=np.float64)[out_rows]
    with np.errstate(divide="ignore", invalid="ignore"):
        values = vals[pos] / cell_total * TARGET_SUM if keys.size else np.zeros(want.size)
    return np.where(found, values, 0.0)
