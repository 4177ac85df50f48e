"""Numba kernels for rank-value tokenization: the fallback when the C++ core is not built.

Same algorithm and the same bit-exact results as ``csrc/rank_tokenize.cpp`` and the oracle
:func:`scfm_fast.tokenizer.reference.rank_tokenize_ref` (its docstring defines the semantics):
cells are split into contiguous, equally loaded ranges, one per thread; each range keeps its own
scratch (a dense per-token accumulator plus a touched list, so duplicate genes are summed in O(nnz)
without per-cell allocation), ranks long cells with the same radix sort as the C++ core (short ones
with a partial quicksort), and writes each cell into a slot of a shared buffer sized by an upper
bound, which is compacted at the end.  Errors come back as ``(kind, row, entry, col)`` rows merged
by :func:`merge_errors` so the reported entry never depends on the thread split.

Use :func:`scfm_fast.tokenizer.rank.tokenize_rank` rather than this module.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ._numba_sort import _BUCKETS, _partial_sort, _radix_rank

# error kinds, ordered by precedence (a bad count anywhere beats a bad index anywhere)
ERR_NONE, ERR_COUNT, ERR_INDEX = 0, 1, 2


@njit(cache=True, nogil=True, error_model="numpy")
def tokenize_range(
    indptr,
    indices,
    data,
    col_token,
    token_median,
    totals,
    has_totals,
    budget,
    cls_token,
    eos_token,
    allow_non_integer,
    c0,
    c1,
    slot_off,
    slots,
    lengths,
    cell_totals,
    acc,
    touched,
    keys,
    toks,
):
    """Tokenize cells ``[c0, c1)`` into ``slots[slot_off[i]:]``; returns ``(kind, row, entry, col)``.

    ``acc`` (zeros, one per token id) is returned to all-zeros; ``touched``, ``keys`` and ``toks``
    must hold the longest row of the range.  Stops at the first bad count; after a bad column index
    it only keeps validating counts (a later bad count still takes precedence).
    """
    n_cols = col_token.shape[0]
    n_special = (1 if cls_token >= 0 else 0) + (1 if eos_token >= 0 else 0)
    err_kind, err_row, err_entry, err_col = ERR_NONE, -1, -1, -1
    # radix-sort scratch, once per range
    longest = keys.shape[0]
    ord_a = np.empty(longest, dtype=np.uint64)
    ord_b = np.empty(longest, dtype=np.uint64)
    tok_a = np.empty(longest, dtype=np.int32)
    tok_b = np.empty(longest, dtype=np.int32)
    dig_a = np.empty(longest, dtype=np.int64)
    counts = np.empty((2, _BUCKETS), dtype=np.int64)
    producing = True
    for i in range(c0, c1):
        lo, hi = indptr[i], indptr[i + 1]
        total = totals[i] if has_totals else 0.0
        gather = producing and ((not has_totals) or total > 0)
        n_touched = 0
        for k in range(lo, hi):
            v = np.float64(data[k])
            bad = not np.isfinite(v) or v < 0
            if not bad and not allow_non_integer:
                bad = v != np.floor(v)
            if bad:
                return ERR_COUNT, i, k, -1
            if not has_totals:
                total = v if k == lo else total + v  # sequential, seeded by the first value
            if not producing:
                continue
            col = np.int64(indices[k])
            if col < 0 or col >= n_cols:
                err_kind, err_row, err_entry, err_col = ERR_INDEX, i, k, col
                producing = False
                continue
            if not gather or v == 0:
                continue
            tok = col_token[col]
            if tok < 0:
                continue
            if acc[tok] == 0.0:
                touched[n_touched] = tok
                n_touched += 1
            acc[tok] += v  # 0.0 + v == v, so this is the sequential sum seeded by the first value
        cell_totals[i] = total
        lengths[i] = 0
        if not producing:
            for r in range(n_touched):
                acc[touched[r]] = 0.0
            continue
        if not total > 0:
            continue
        n = 0
        for r in range(n_touched):
            tok = touched[r]
            key = acc[tok] / token_median[tok]
            acc[tok] = 0.0
            if key != 0:
                keys[n] = key
                toks[n] = tok
                n += 1
        if n == 0:
            continue
        keep = min(n, budget)
        ranked = toks
        if n >= 192:  # below that the fixed 2 x 2048-bucket cost of the radix sort dominates
            if _radix_rank(keys, toks, n, keep, ord_a, tok_a, dig_a, ord_b, tok_b, counts):
                ranked = tok_a
        else:
            _partial_sort(keys, toks, n, keep)
        w = slot_off[i]
        if cls_token >= 0:
            slots[w] = cls_token
            w += 1
        for r in range(keep):
            slots[w] = ranked[r]
            w += 1
        if eos_token >= 0:
            slots[w] = eos_token
            w += 1
        lengths[i] = keep + n_special
    return err_kind, err_row, err_entry, err_col


@njit(cache=True, nogil=True, error_model="numpy")
def _run_part(
    indptr,
    indices,
    data,
    col_token,
    token_median,
    totals,
    has_totals,
    budget,
    cls_token,
    eos_token,
    allow_non_integer,
    c0,
    c1,
    slot_off,
    slots,
    lengths,
    cell_totals,
):
    """Allocate one range's scratch (once per range, not per cell) and tokenize it."""
    longest = 0
    for i in range(c0, c1):
        longest = max(longest, indptr[i + 1] - indptr[i])
    acc = np.zeros(token_median.shape[0], dtype=np.float64)
    touched = np.empty(longest, dtype=np.int64)
    keys = np.empty(longest, dtype=np.float64)
    toks = np.empty(longest, dtype=np.int32)
    return tokenize_range(
        indptr,
        indices,
        data,
        col_token,
        token_median,
        totals,
        has_totals,
        budget,
        cls_token,
        eos_token,
        allow_non_integer,
        c0,
        c1,
        slot_off,
        slots,
        lengths,
        cell_totals,
        acc,
        touched,
        keys,
        toks,
    )


@njit(cache=True, parallel=True, error_model="numpy")
def _run_parallel(
    indptr,
    indices,
    data,
    col_token,
    token_median,
    totals,
    has_totals,
    budget,
    cls_token,
    eos_token,
    allow_non_integer,
    bounds,
    slot_off,
    slots,
    lengths,
    cell_totals,
):
    n_parts = bounds.shape[0] - 1
    errors = np.empty((n_parts, 4), dtype=np.int64)
    for p in prange(n_parts):
        e = _run_part(
            indptr,
            indices,
            data,
            col_token,
            token_median,
            totals,
            has_totals,
            budget,
            cls_token,
            eos_token,
            allow_non_integer,
            bounds[p],
            bounds[p + 1],
            slot_off,
            slots,
            lengths,
            cell_totals,
        )
        errors[p, 0], errors[p, 1], errors[p, 2], errors[p, 3] = e
    return errors


@njit(cache=True, parallel=True, error_model="numpy")
def _compact_parallel(slots, slot_off, offsets, out):
    for i in prange(offsets.shape[0] - 1):
        s = slot_off[i]
        o = offsets[i]
        for r in range(offsets[i + 1] - o):
            out[o + r] = slots[s + r]


@njit(cache=True, nogil=True, error_model="numpy")
def _compact_serial(slots, slot_off, offsets, out):
    for i in range(offsets.shape[0] - 1):
        s = slot_off[i]
        o = offsets[i]
        for r in range(offsets[i + 1] - o):
            out[o + r] = slots[s + r]


def split_cells(indptr: np.ndarray, n_parts: int) -> np.ndarray:
    """Boundaries of ``n_parts`` contiguous cell ranges of about equal work (nnz + 16 per cell)."""
    n_cells = indptr.shape[0] - 1
    work = (indptr - indptr[0]) + 16 * np.arange(n_cells + 1, dtype=np.int64)
    targets = work[-1] * np.arange(n_parts + 1, dtype=np.int64) // max(n_parts, 1)
    bounds = np.searchsorted(work, targets, side="left").astype(np.int64)
    bounds[0], bounds[-1] = 0, n_cells
    return np.maximum.accumulate(bounds)


def merge_errors(errors: np.ndarray) -> tuple[int, int, int, int]:
    """The error the oracle would raise among per-range ``(kind, row, entry, col)`` rows."""
    best = (ERR_NONE, -1, -1, -1)
    for kind, row, entry, col in errors.tolist():
        if kind == ERR_NONE:
            continue
        if best[0] == ERR_NONE or (kind, entry) < (best[0], best[2]):
            best = (kind, row, entry, col)
    return best


def rank_tokenize_numba(
    indptr,
    indices,
    data,
    col_token,
    token_median,
    totals,
    budget,
    cls_token,
    eos_token,
    allow_non_integer,
    n_threads,
):
    """Tokenize a validated chunk; returns ``(tokens, offsets, totals, error)``.

    Arrays must already have their final dtypes (``indptr`` int64, ``indices`` int32/int64, ``data``
    float32/float64, ``col_token`` int32, ``token_median`` and ``totals`` float64 or ``None``).
    ``error`` is ``(kind, row, entry, col)``, kind :data:`ERR_NONE` when the chunk was fine.
    """
    n_cells = indptr.shape[0] - 1
    n_special = int(cls_token >= 0) + int(eos_token >= 0)
    nnz = np.diff(indptr)
    slot_len = np.where(nnz > 0, np.minimum(nnz, budget) + n_special, 0)
    slot_off = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(slot_len, out=slot_off[1:])
    slots = np.empty(int(slot_off[-1]), dtype=np.int32)
    lengths = np.zeros(n_cells, dtype=np.int64)
    cell_totals = np.zeros(n_cells, dtype=np.float64)
    has_totals = totals is not None
    tot = totals if has_totals else np.zeros(0, dtype=np.float64)
    n_parts = max(1, min(int(n_threads), n_cells))
    args = (
        indptr,
        indices,
        data,
        col_token,
        token_median,
        tot,
        has_totals,
        np.int64(budget),
        np.int64(cls_token),
        np.int64(eos_token),
        bool(allow_non_integer),
    )
    if n_parts == 1:
        # no threading layer at all: cheaper, and safe in fork()-ed DataLoader workers
        error = _run_part(*args, np.int64(0), np.int64(n_cells), slot_off, slots, lengths, cell_totals)
    else:
        bounds = split_cells(indptr, n_parts)
        previous = numba.get_num_threads()
        numba.set_num_threads(min(n_parts, numba.config.NUMBA_NUM_THREADS))
        try:
            errors = _run_parallel(*args, bounds, slot_off, slots, lengths, cell_totals)
        finally:
            numba.set_num_threads(previous)  # restore the process-wide setting, as scanpy does
        error = merge_errors(errors)
    if error[0] != ERR_NONE:
        return None, None, None, tuple(int(x) for x in error)
    offsets = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.empty(int(offsets[-1]), dtype=np.int32)
    if n_parts == 1:
        _compact_serial(slots, slot_off, offsets, tokens)
    else:
        previous = numba.get_num_threads()
        numba.set_num_threads(min(n_parts, numba.config.NUMBA_NUM_THREADS))
        try:
            _compact_parallel(slots, slot_off, offsets, tokens)
        finally:
            numba.set_num_threads(previous)
    return tokens, offsets, cell_totals, (ERR_NONE, -1, -1, -1)
