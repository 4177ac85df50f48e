"""Thread policy of the fast tokenizer paths: explicit n_threads, 1 in DataLoader workers and forked
children, Numba's global thread count restored."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys

import numpy as np
import pytest

from scfm_fast import _ext
from scfm_fast.tokenizer.rank import available_backends, tokenize_rank


def test_explicit_and_default_threads():
    assert _ext.resolve_n_threads(3) == 3
    assert _ext.resolve_n_threads(None) == (1 if _ext.in_worker_process() else _ext.available_cpus())
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="n_threads"):
            _ext.resolve_n_threads(bad)


def _child_threads(queue):
    queue.put(_ext.resolve_n_threads(None))


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs fork()")
def test_forked_child_defaults_to_one_thread():
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_threads, args=(queue,))
    proc.start()
    got = queue.get(timeout=60)
    proc.join(timeout=60)
    assert got == 1


class _ThreadsDataset:
    def __len__(self):
        return 1

    def __getitem__(self, i):
        # tokenizing inside the worker must work and see the worker policy
        out = tokenize_rank(
            np.array([0, 2]),
            np.array([0, 1]),
            np.array([1.0, 2.0]),
            col_token=np.array([0, 1], np.int32),
            token_median=np.ones(2),
            max_len=4,
        )
        return _ext.resolve_n_threads(None), out[0].tolist()


def test_dataloader_worker_defaults_to_one_thread():
    torch = pytest.importorskip("torch")
    loader = torch.utils.data.DataLoader(
        _ThreadsDataset(), batch_size=None, num_workers=1, multiprocessing_context="spawn"
    )
    ((n, toks),) = list(loader)
    assert int(n) == 1
    assert list(toks) == [1, 0]


@pytest.mark.skipif(available_backends()["numba"] is not None, reason="numba unavailable")
def test_numba_thread_count_restored():
    numba = pytest.importorskip("numba")
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        tokenize_rank(
            np.array([0, 1, 2, 3]),
            np.array([0, 1, 0]),
            np.array([1.0, 2.0, 3.0]),
            col_token=np.array([0, 1], np.int32),
            token_median=np.ones(2),
            max_len=4,
            backend="numba",
            n_threads=2,
        )
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(previous)
