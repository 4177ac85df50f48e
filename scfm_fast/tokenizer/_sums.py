"""Numba kernel of the match report's count sums; its own module so that the pipeline imports numba
only when the first chunk is tokenized (``scfm tokenize`` start-up), while staying cacheable."""

from __future__ import annotations

import numba


@numba.njit(cache=True, nogil=True)
def count_sums(indices, data, col_token):
    """Total counts and counts on vocabulary genes, in one pass (for the match report)."""
    tot = 0.0
    matched = 0.0
    for k in range(indices.shape[0]):
        v = float(data[k])
        tot += v
        if col_token[indices[k]] >= 0:
            matched += v
    return tot, matched
