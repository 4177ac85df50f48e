"""Reusable arrays for large, short-lived reads: decoded Zarr chunks and HDF5 reads of a CSR matrix's arrays.

A tokenize run reads tens of MiB per block, uses the block for a moment and drops it. A fresh NumPy array
that large is always a new ``mmap`` (glibc never serves >= 32 MiB from its heap), so the kernel zero-fills
every page of it before the read overwrites it: ~12% of a 200,000-cell Zarr run's CPU. The pool hands out
views of a few arrays it keeps, each one again only once no view of it is alive any more (its reference
count says so), so a reused array is never overwritten under a reader.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

#: requests below this size are plain ``np.empty`` (glibc's heap already reuses those)
MIN_POOLED_BYTES = 1 << 20
#: arrays kept: enough for the blocks in flight of the in-process pipeline (two arrays per block)
MAX_POOLED = 8
#: headroom on a new array: blocks of one file differ a little in size
_SLACK = 1.25


class BufferPool:
    """Hands out ``empty(n, dtype)`` arrays backed by reused memory.

    Parameters
    ----------
    max_buffers
        Arrays kept at most; when all are in use a request gets a plain new array.
    """

    def __init__(self, *, max_buffers: int = MAX_POOLED) -> None:
        self.max_buffers = max_buffers
        self._bufs: list[np.ndarray] = []
        self._lock = threading.Lock()

    def _free(self, i: int) -> bool:
        # referenced only by the pool's list and getrefcount's argument: every view handed out (each holds
        # the array as its base) has been released
        return sys.getrefcount(self._bufs[i]) <= 2

    def empty(self, n: int, dtype: np.dtype | type) -> np.ndarray:
        """An uninitialised 1-D array of ``n`` elements; pooled when it is large."""
        dtype = np.dtype(dtype)
        nbytes = int(n) * dtype.itemsize
        if nbytes < MIN_POOLED_BYTES:
            return np.empty(n, dtype=dtype)
        with self._lock:
            pick = None
            for i in range(len(self._bufs)):
                size = self._bufs[i].nbytes
                if size >= nbytes and self._free(i) and (pick is None or size < self._bufs[pick].nbytes):
                    pick = i
            if pick is None:
                new = np.empty(int(nbytes * _SLACK), dtype=np.uint8)
                if len(self._bufs) < self.max_buffers:
                    self._bufs.append(new)
                else:  # replace a free array that is too small, if any
                    small = next((i for i in range(len(self._bufs)) if self._free(i)), None)
                    if small is None:
                        return np.empty(n, dtype=dtype)
                    self._bufs[small] = new
                buf = new
            else:
                buf = self._bufs[pick]
            return buf[:nbytes].view(dtype)

    def clear(self) -> None:
        """Drop the kept arrays (views handed out stay valid)."""
        with self._lock:
            self._bufs.clear()


#: the process's pool for reads (a forked worker starts with the parent's arrays, copy-on-write)
READS = BufferPool()
