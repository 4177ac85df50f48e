"""Plain NumPy rank-value tokenization: the oracle for the C++ and Numba paths.

Semantics (Geneformer, made deterministic)
------------------------------------------
For each cell (a CSR row over the *source* gene columns):

1. Every stored count must be finite and ``>= 0``; unless ``allow_non_integer`` it must also be an
   integer (Geneformer expects raw counts).  The first offending entry raises
   :class:`~scfm_fast._errors.CountDataError` naming the cell row and column.
2. The cell total is ``totals[i]`` when given (Geneformer's ``n_counts``), else the sum of all the
   row's counts, over every gene, in the vocabulary or not.
3. Columns whose gene is in the vocabulary (``col_token >= 0``) contribute; columns that map to the
   same token (duplicate genes) are summed, in float64, in column order.

   Both sums (2 and 3) are *sequential*, left to right in stored-entry order, starting from the
   first value (``np.cumsum(v)[-1]``; ``0.0`` for an empty row), not NumPy's pairwise ``sum``:
   compiled backends reproduce a sequential sum bit for bit on every platform.  For integer counts
   (below 2**53) every order gives the same exact result anyway.
4. Value = count / total x 10,000 / median.  The per-cell factor 10,000 / total is positive and the
   same for every gene of the cell, so it cannot change the order; the ranking key used is
   ``count / median`` in float64, which avoids rounding-induced ties from the extra multiplication.
5. Genes with a zero count are dropped; the rest are ordered by key, highest first.  **Ties are
   broken by token id, ascending** (Geneformer's unstable numpy argsort leaves them unspecified).
6. The list is truncated to ``max_len`` minus the special tokens, then ``<cls>`` is prepended and
   ``<eos>`` appended when given (Geneformer V2).  A cell with no expressed vocabulary gene (or a
   zero total) gets *no* tokens at all, special tokens included.
"""

from __future__ import annotations

import math

import numpy as np

from .._errors import CountDataError


def check_counts_ref(indptr: np.ndarray, data: np.ndarray, *, allow_non_integer: bool = False) -> None:
    """Raise :class:`CountDataError` on the first negative, NaN/Inf or (optionally) fractional count."""
    bad = ~np.isfinite(data) | (data < 0)
    if not allow_non_integer:
        with np.errstate(invalid="ignore"):
            bad |= np.isfinite(data) & (data != np.floor(data))
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        row = int(np.searchsorted(indptr, j, side="right") - 1)
        raise CountDataError(_count_error(row, j, float(data[j]), allow_non_integer=allow_non_integer))


def _seq_sum(values: np.ndarray) -> float:
    """Left-to-right float64 sum starting from the first value (``0.0`` when empty).

    ``np.add.accumulate`` is strictly sequential, unlike ``np.sum`` (pairwise), so the C++ and Numba
    backends can reproduce it bit for bit.
    """
    if values.size == 0:
        return 0.0
    return float(np.add.accumulate(values, dtype=np.float64)[-1])


def _token_sums(row_cols: np.ndarray, row_vals: np.ndarray, col_token: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vocabulary tokens of one row (ascending) and their summed nonzero counts (step 3)."""
    toks = col_token[row_cols]
    keep = (toks >= 0) & (row_vals != 0)
    toks, vals = toks[keep].astype(np.int64), row_vals[keep]
    # sum duplicates: stable sort by token keeps column order inside a group
    order = np.argsort(toks, kind="stable")
    toks, vals = toks[order], vals[order]
    uniq, start = np.unique(toks, return_index=True)
    sums = np.array([_seq_sum(vals[s:e]) if e - s > 1 else vals[s]
                     for s, e in zip(start, np.append(start[1:], toks.size))], dtype=np.float64)
    return uniq, sums


def count_problem(value: float) -> str:
    """What is wrong with a count that failed the raw-count check ("a NaN/Inf count", ...)."""
    if not np.isfinite(value):
        return "a NaN/Inf count"
    if value < 0:
        return "a negative count"
    return "a non-integer count"


def _count_error(row: int, entry: int, value: float, *, allow_non_integer: bool) -> str:
    what = count_problem(value)
    fix = "pass raw counts (e.g. layer='counts' or use_raw=True)"
    if what == "a non-integer count" and not allow_non_integer:
        fix += ", or allow_non_integer=True if the values are e.g. ambient-corrected counts"
    return f"cell row {row} has {what} ({float(value)!r}) at stored entry {entry}; {fix}"


def rank_tokenize_ref(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    *,
    col_token: np.ndarray,
    token_median: np.ndarray,
    max_len: int,
    cls_token: int = -1,
    eos_token: int = -1,
    totals: np.ndarray | None = None,
    allow_non_integer: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize a CSR chunk of cells.

    Parameters
    ----------
    indptr, indices, data
        CSR arrays of the chunk (``indices`` are source gene columns).
    col_token
        ``int32`` token id per source column, ``-1`` for genes outside the vocabulary.
    token_median
        ``float64`` gene median per token id (only entries reached through ``col_token`` are read).
    max_len
        Model input size, special tokens included.
    cls_token, eos_token
        Token ids to prepend / append, ``-1`` for none.
    totals
        Per-cell totals (``n_counts``); computed from the row when ``None``.
    allow_non_integer
        Accept fractional counts.

    Returns
    -------
    tokens
        ``int32`` concatenated token ids of all cells.
    offsets
        ``int64`` array of length ``n_cells + 1``; cell ``i`` is ``tokens[offsets[i]:offsets[i+1]]``.
    cell_totals
        ``float64`` total used for each cell.
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    data = np.asarray(data)
    check_counts_ref(indptr, data, allow_non_integer=allow_non_integer)
    n_cells = indptr.shape[0] - 1
    n_special = int(cls_token >= 0) + int(eos_token >= 0)
    budget = max_len - n_special
    if budget < 1:
        msg = f"max_len={max_len} leaves no room for genes after {n_special} special tokens"
        raise ValueError(msg)
    out: list[np.ndarray] = []
    lengths = np.zeros(n_cells, dtype=np.int64)
    cell_totals = np.zeros(n_cells, dtype=np.float64)
    for i in range(n_cells):
        lo, hi = indptr[i], indptr[i + 1]
        row_cols = np.asarray(indices[lo:hi], dtype=np.int64)
        row_vals = data[lo:hi].astype(np.float64)
        if totals is not None:
            total = float(totals[i])
        else:
            total = _seq_sum(row_vals)
        cell_totals[i] = total
        if not total > 0:
            continue
        uniq, sums = _token_sums(row_cols, row_vals, col_token)
        if uniq.size == 0:
            continue
        keys = sums / token_median[uniq]
        nz = keys != 0
        uniq, keys = uniq[nz], keys[nz]
        if uniq.size == 0:
            continue
        # key descending, token ascending: lexsort's last key is the primary one
        ranked = uniq[np.lexsort((uniq, -keys))][:budget].astype(np.int32)
        parts = []
        if cls_token >= 0:
            parts.append(np.array([cls_token], dtype=np.int32))
        parts.append(ranked)
        if eos_token >= 0:
            parts.append(np.array([eos_token], dtype=np.int32))
        cell = np.concatenate(parts)
        out.append(cell)
        lengths[i] = cell.size
    offsets = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(out) if out else np.zeros(0, dtype=np.int32)
    return tokens.astype(np.int32, copy=False), offsets, cell_totals


def log2_1p(x: np.ndarray) -> np.ndarray:
    """``log2(1 + x)`` elementwise in float64 through the C library's ``log2`` (``math.log2``).

    NumPy's ``np.log2`` may use its own SIMD approximation (SVML on AVX-512 machines), which can
    differ from the C library in the last bit; ``math.log2``, the C++ core's ``std::log2`` and
    Numba's ``math.log2`` all call the platform's ``log2``, so the three backends agree bit for bit.
    """
    flat = np.asarray(x, dtype=np.float64).ravel()
    out = np.fromiter((math.log2(1.0 + v) for v in flat.tolist()),
                      dtype=np.float64, count=flat.size)
    return out.reshape(np.shape(x))


def value_tokenize_ref(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    *,
    col_token: np.ndarray,
    token_median: np.ndarray,
    max_len: int,
    normalize_total: float | None = None,
    totals: np.ndarray | None = None,
    allow_non_integer: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """GeneCompass value tokenization of a CSR chunk of cells: token ids *and* their values.

    Semantics (GeneCompass, made deterministic)
    --------------------------------------------
    Steps 1-3 and 5 are those of :func:`rank_tokenize_ref` (count checks, totals, duplicate genes
    summed, zero counts dropped), with no special tokens:

    * ``key = count / median`` in float64 orders the genes, highest first, **ties by token id
      ascending**; the top ``max_len`` are kept.  (GeneCompass sorts by its value with an unstable
      argsort; the value is a monotone function of the key, so this is its order with ties fixed.)
    * ``value = log2(1 + key)`` on raw counts (GeneCompass's released corpus), or with
      ``normalize_total=T``: ``log2(1 + key * (T / total))``, i.e. count / total x T / median.  The
      per-cell factor is applied to the key (one rounding, monotone), so values never increase
      along the order; ``log2`` is the C library's (see :func:`log2_1p`).  Values are then rounded
      to float32.
    * A cell whose total is not > 0 or with no expressed vocabulary gene gets no tokens.

    Returns
    -------
    tokens
        ``int32`` concatenated token ids of all cells.
    values
        ``float32`` value of each token, same order.
    offsets
        ``int64``, ``n_cells + 1``; cell ``i`` is ``tokens[offsets[i]:offsets[i+1]]``.
    cell_totals
        ``float64`` total of each cell (given or summed).
    """
    tokens, offsets, cell_totals = rank_tokenize_ref(
        indptr, indices, data, col_token=col_token, token_median=token_median, max_len=max_len,
        totals=totals, allow_non_integer=allow_non_integer,
    )
    indptr = np.asarray(indptr, dtype=np.int64)
    keys = np.zeros(tokens.shape[0], dtype=np.float64)
    for i in range(indptr.shape[0] - 1):
        lo, hi = offsets[i], offsets[i + 1]
        if hi == lo:
            continue
        row = slice(indptr[i], indptr[i + 1])
        uniq, sums = _token_sums(np.asarray(indices[row], dtype=np.int64), data[row].astype(np.float64), col_token)
        cell_keys = sums[np.searchsorted(uniq, tokens[lo:hi])] / token_median[tokens[lo:hi]]
        if normalize_total is not None:
            cell_keys = cell_keys * (float(normalize_total) / cell_totals[i])
        keys[lo:hi] = cell_keys
    return tokens, log2_1p(keys).astype(np.float32), offsets, cell_totals
