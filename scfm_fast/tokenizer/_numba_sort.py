"""Per-cell ranking for the Numba tokenizer kernels (:mod:`scfm_fast.tokenizer._numba`): order a cell's
``(key, token)`` pairs by key descending, ties by token ascending — the same total order as the C++ core's
radix sort (``csrc/rank_tokenize.cpp``) and the NumPy oracle. Long cells use an LSD radix sort on the
float64 key bits, short ones a partial quicksort of the top ``keep``.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _before(ka, ta, kb, tb):
    """Rank order: key descending, NaN keys last, ties by token ascending (a strict total order)."""
    if ka != ka:
        return kb != kb and ta < tb
    if kb != kb:
        return True
    return ka > kb or (ka == kb and ta < tb)


@njit(cache=True, nogil=True, error_model="numpy")
def _partial_sort(keys, toks, n, k):
    """Sort ``(keys, toks)[:n]`` in place so that its first ``k`` entries are in rank order.

    A quicksort that skips partitions lying wholly at or beyond ``k`` (so it is also the
    truncation's selection step), with insertion sort on short partitions; the order is total, so
    the result does not depend on pivots.
    """
    stack = np.empty(128, dtype=np.int64)
    sp = 0
    lo, hi = 0, n - 1
    while True:
        if hi - lo < 16:
            for i in range(lo + 1, hi + 1):
                kk, tt = keys[i], toks[i]
                j = i - 1
                while j >= lo and _before(kk, tt, keys[j], toks[j]):
                    keys[j + 1], toks[j + 1] = keys[j], toks[j]
                    j -= 1
                keys[j + 1], toks[j + 1] = kk, tt
            if sp == 0:
                return
            sp -= 2
            lo, hi = stack[sp], stack[sp + 1]
            continue
        # median of three moved to hi as the pivot
        mid = (lo + hi) // 2
        if _before(keys[mid], toks[mid], keys[lo], toks[lo]):
            keys[mid], keys[lo] = keys[lo], keys[mid]
            toks[mid], toks[lo] = toks[lo], toks[mid]
        if _before(keys[hi], toks[hi], keys[lo], toks[lo]):
            keys[hi], keys[lo] = keys[lo], keys[hi]
            toks[hi], toks[lo] = toks[lo], toks[hi]
        if _before(keys[mid], toks[mid], keys[hi], toks[hi]):
            keys[mid], keys[hi] = keys[hi], keys[mid]
            toks[mid], toks[hi] = toks[hi], toks[mid]
        pk, pt = keys[hi], toks[hi]
        store = lo
        for i in range(lo, hi):
            if _before(keys[i], toks[i], pk, pt):
                keys[i], keys[store] = keys[store], keys[i]
                toks[i], toks[store] = toks[store], toks[i]
                store += 1
        keys[hi], keys[store] = keys[store], keys[hi]
        toks[hi], toks[store] = toks[store], toks[hi]
        # left part [lo, store-1] always matters when lo < k; right part only if it starts below k
        left_lo, left_hi = lo, store - 1
        right_lo, right_hi = store + 1, hi
        need_right = right_lo < k and right_lo < right_hi
        need_left = left_lo < left_hi
        if need_left and need_right:
            # push the larger side, loop on the smaller: the stack stays O(log n) deep
            if left_hi - left_lo > right_hi - right_lo:
                stack[sp], stack[sp + 1] = left_lo, left_hi
                lo, hi = right_lo, right_hi
            else:
                stack[sp], stack[sp + 1] = right_lo, right_hi
                lo, hi = left_lo, left_hi
            sp += 2
        elif need_left:
            lo, hi = left_lo, left_hi
        elif need_right:
            lo, hi = right_lo, right_hi
        else:
            if sp == 0:
                return
            sp -= 2
            lo, hi = stack[sp], stack[sp + 1]


_SIGN = np.uint64(0x8000000000000000)
_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)
_DIGIT_BITS = 11
_BUCKETS = 1 << _DIGIT_BITS


@njit(cache=True, nogil=True, error_model="numpy")
def _radix_rank(keys, toks, n, keep, ord_a, tok_a, dig_a, ord_b, tok_b, counts):
    """Rank ``(keys, toks)[:n]`` like ``_partial_sort``, in O(n) for typical cells.

    Twin of ``radix_rank`` in ``csrc/rank_tokenize.cpp``: keys become unsigned integers whose
    ascending order is the rank order (NaN last); two stable 11-bit LSD passes on a monotone 22-bit
    digest, then an insertion pass with the exact (order, token) comparison.  Returns ``True`` with
    the ranked tokens in ``tok_a[:n]``, or ``False`` after falling back to ``_partial_sort`` (many
    equal keys), which leaves them in ``toks[:n]``.
    """
    bits = keys.view(np.uint64)
    lo, hi = _ONES, np.uint64(0)
    for r in range(n):
        b = bits[r]
        if keys[r] != keys[r]:
            o = _ONES
        elif b & _SIGN:
            o = b
        else:
            o = _ONES ^ (b | _SIGN)
        ord_a[r] = o
        tok_a[r] = toks[r]
        lo = min(lo, o)
        hi = max(hi, o)
    span = hi - lo
    range_bits = 0
    while range_bits < 64 and (span >> np.uint64(range_bits)) != np.uint64(0):
        range_bits += 1
    shift = np.uint64(max(0, range_bits - 2 * _DIGIT_BITS))
    counts[:] = 0
    for r in range(n):
        d = np.int64((ord_a[r] - lo) >> shift)
        dig_a[r] = d
        counts[0, d & (_BUCKETS - 1)] += 1
        counts[1, d >> _DIGIT_BITS] += 1
    s0 = 0
    s1 = 0
    for b in range(_BUCKETS):
        t0, t1 = counts[0, b], counts[1, b]
        counts[0, b], counts[1, b] = s0, s1
        s0 += t0
        s1 += t1
    for r in range(n):
        j = counts[0, dig_a[r] & (_BUCKETS - 1)]
        counts[0, dig_a[r] & (_BUCKETS - 1)] = j + 1
        ord_b[j] = ord_a[r]
        tok_b[j] = tok_a[r]
    for r in range(n):  # high digit, recomputed rather than carried through the first pass
        d = np.int64((ord_b[r] - lo) >> shift) >> _DIGIT_BITS
        j = counts[1, d]
        counts[1, d] = j + 1
        ord_a[j] = ord_b[r]
        tok_a[j] = tok_b[r]
    moves = 0
    for i in range(1, n):
        o, t = ord_a[i], tok_a[i]
        j = i
        while j > 0 and (o < ord_a[j - 1] or (o == ord_a[j - 1] and t < tok_a[j - 1])):
            ord_a[j] = ord_a[j - 1]
            tok_a[j] = tok_a[j - 1]
            j -= 1
        ord_a[j] = o
        tok_a[j] = t
        moves += i - j
        if moves > 16 * n:  # long runs of equal keys: stop paying O(run^2)
            _partial_sort(keys, toks, n, keep)
            return False
    return True
