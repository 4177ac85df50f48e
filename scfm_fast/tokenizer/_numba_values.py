"""Numba twin of ``csrc/value_tokenize.cpp``: GeneCompass values of tokens ranked by the rank kernels.

Bit-identical to the C++ core and to :func:`scfm_fast.tokenizer.reference.value_tokenize_ref`; use
:func:`scfm_fast.tokenizer.values.tokenize_values` rather than this module.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from ._numba import split_cells


@njit(cache=True, nogil=True, error_model="numpy")
def _values_range(indptr, indices, data, col_token, token_median, tokens, offsets, factor, has_factor,
                  c0, c1, values):
    """GeneCompass values of cells ``[c0, c1)`` (twin of ``token_values`` in csrc/value_tokenize.cpp).

    Re-sums each vocabulary token's nonzero counts in stored order (``0.0 + v == v``, so the sum is
    the oracle's sequential one) into a dense accumulator, then ``log2(1 + key * factor)``.
    """
    acc = np.zeros(token_median.shape[0], dtype=np.float64)
    for i in range(c0, c1):
        if offsets[i + 1] == offsets[i]:
            continue
        for k in range(indptr[i], indptr[i + 1]):
            tok = col_token[indices[k]]
            v = np.float64(data[k])
            if tok >= 0 and v != 0:
                acc[tok] += v
        f = factor[i] if has_factor else 1.0
        for r in range(offsets[i], offsets[i + 1]):
            tok = tokens[r]
            values[r] = np.float32(math.log2(1.0 + acc[tok] / token_median[tok] * f))
        for k in range(indptr[i], indptr[i + 1]):
            tok = col_token[indices[k]]
            if tok >= 0:
                acc[tok] = 0.0


@njit(cache=True, parallel=True, error_model="numpy")
def _values_parallel(indptr, indices, data, col_token, token_median, tokens, offsets, factor, has_factor,
                     bounds, values):
    for p in prange(bounds.shape[0] - 1):
        _values_range(indptr, indices, data, col_token, token_median, tokens, offsets, factor, has_factor,
                      bounds[p], bounds[p + 1], values)


def token_values_numba(indptr, indices, data, col_token, token_median, tokens, offsets, cell_factor, n_threads):
    """float32 GeneCompass values of ``tokens`` ranked by :func:`rank_tokenize_numba` on the same chunk.

    ``cell_factor`` is the float64 per-cell factor on the key, or ``None`` for 1.
    """
    n_cells = indptr.shape[0] - 1
    values = np.empty(tokens.shape[0], dtype=np.float32)
    has_factor = cell_factor is not None
    factor = cell_factor if has_factor else np.zeros(0, dtype=np.float64)
    args = (indptr, indices, data, col_token, token_median, tokens, offsets, factor, has_factor)
    n_parts = max(1, min(int(n_threads), n_cells))
    if n_parts == 1:
        _values_range(*args, np.int64(0), np.int64(n_cells), values)
        return values
    previous = numba.get_num_threads()
    numba.set_num_threads(min(n_parts, numba.config.NUMBA_NUM_THREADS))
    try:
        _values_parallel(*args, split_cells(indptr, n_parts), values)
    finally:
        numba.set_num_threads(previous)
    return values
