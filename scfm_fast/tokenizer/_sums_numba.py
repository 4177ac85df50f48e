"""Numba kernel of the match report's count sums (the fallback of :mod:`._sums` when the C++ core
is not built); its own module so that numba is imported only when needed, while staying cacheable."""

from __future__ import annotations

import numba


@numba.njit(cache=True, nogil=True)
def count_sums_numba(indices, data, col_token):
    """Total counts and counts on vocabulary genes, in one pass (for the match report)."""
    tot = 0.0
    matched = 0.0
    for k in range(indices.shape[0]):
        v = float(data[k])
        tot += v
        if col_token[indices[k]] >= 0:
            matched += v
    return tot, matched
