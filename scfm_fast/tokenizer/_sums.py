"""The match report's count sums of a chunk: the compiled core when built, else a Numba kernel.

Both are sequential float64 sums in stored order, so they agree bit for bit.  The core path keeps
numba (~0.4 s of CPU to import) out of ``scfm tokenize`` entirely; the Numba kernel lives in
:mod:`._sums_numba`, imported only when the core is missing.
"""

from __future__ import annotations

import numpy as np

from .. import _ext


def count_sums(indices: np.ndarray, data: np.ndarray, col_token: np.ndarray) -> tuple[float, float]:
    """Total counts and counts on vocabulary genes (``col_token >= 0``), in one pass.

    Parameters
    ----------
    indices, data
        The chunk's stored column indices and counts.
    col_token
        int32 token id per column, negative when the gene is not in the vocabulary.

    Returns
    -------
    tuple of float
        ``(total, matched)``.
    """
    core = _ext.core
    if core is not None and data.dtype in (np.float32, np.float64) and indices.dtype in (np.int32, np.int64):
        return core.count_sums(np.ascontiguousarray(indices), np.ascontiguousarray(data),
                               np.ascontiguousarray(col_token, dtype=np.int32))
    from ._sums_numba import count_sums_numba

    return count_sums_numba(indices, data, col_token)
