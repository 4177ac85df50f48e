"""Geneformer's ``keep_counts`` column: each token's normalised count, in the cell's rank order."""

from __future__ import annotations

import numpy as np

#: Geneformer's normalisation target (counts per 10,000)
TARGET_SUM = 10_000.0


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
