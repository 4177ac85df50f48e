"""The read buffer pool never hands out memory that a live array still views."""

from __future__ import annotations

import gc

import numpy as np

from scfm_fast._buffers import MIN_POOLED_BYTES, BufferPool

N = MIN_POOLED_BYTES // 4  # float32 elements of one pooled request


def test_memory_is_reused_only_after_every_view_is_gone():
    pool = BufferPool(max_buffers=2)
    a = pool.empty(N, np.float32)
    a[:] = 1.0
    owner = a.base
    view = a[10:20]
    del a
    b = pool.empty(N, np.float32)
    assert b.base is not owner  # a view of the first array is alive
    b[:] = 2.0
    assert np.all(view == 1.0)
    del view, b, owner
    gc.collect()
    c = pool.empty(N, np.int32)  # both arrays free again: one is reused, none added
    assert c.base is not None and c.dtype == np.int32 and c.size == N
    assert len(pool._bufs) == 2


def test_full_pool_falls_back_to_plain_arrays_and_small_requests_are_plain():
    pool = BufferPool(max_buffers=1)
    a = pool.empty(N, np.float64)
    b = pool.empty(N, np.float64)  # the only pooled array is in use
    assert a.base is not None and b.base is None
    assert pool.empty(10, np.float32).base is None
    del a
    gc.collect()
    big = pool.empty(4 * N, np.float64)  # larger than the free array: replaces it
    assert big.base is not None and big.size == 4 * N and len(pool._bufs) == 1
