"""The C++ core keeps the last freed token buffer for the next call (its pages are already faulted
in): a buffer must only come back once NumPy has freed its array, whatever its size, on any thread,
after an error too, and every result must stay the oracle's."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

from scfm_fast._errors import CountDataError
from scfm_fast.tokenizer.rank import tokenize_rank
from scfm_fast.tokenizer.reference import rank_tokenize_ref

pytest.importorskip("scfm_fast._core")


def _chunk(seed, n_cells, n_cols=300):
    rng = np.random.default_rng(seed)
    col_token = rng.permutation(n_cols).astype(np.int32)
    token_median = rng.lognormal(0.0, 1.0, n_cols)
    nnz = rng.integers(1, n_cols, n_cells)
    indptr = np.concatenate([[0], np.cumsum(nnz)]).astype(np.int64)
    indices = np.concatenate([np.sort(rng.choice(n_cols, k, replace=False)) for k in nnz]).astype(np.int32)
    data = rng.geometric(0.5, indptr[-1]).astype(np.float32)
    kw = dict(col_token=col_token, token_median=token_median, max_len=256, cls_token=0)
    return (indptr, indices, data), kw


def _check(args, kw, out):
    ref = rank_tokenize_ref(*args, **kw)
    for got, want in zip(out, ref):
        np.testing.assert_array_equal(got, want)


def test_live_arrays_are_never_reused():
    # sizes up and down: the kept buffer is grown or shrunk for the next call
    chunks = [_chunk(seed, n) for seed, n in enumerate([50, 400, 20, 800, 5, 300])]
    alive = []
    for i, (args, kw) in enumerate(chunks):
        out = tokenize_rank(*args, backend="cpp", n_threads=1 + i % 2, **kw)
        alive.append((args, kw, out, out[0].copy()))
        if i % 2 == 1:  # free an older result now and then: its buffer is kept for the next call
            del alive[0]
            gc.collect()
        for _, _, o, snapshot in alive:  # no live result was overwritten
            np.testing.assert_array_equal(o[0], snapshot)
    for a, k, o, _ in alive:
        _check(a, k, o)


def test_views_keep_the_buffer():
    args, kw = _chunk(7, 200)
    tokens = tokenize_rank(*args, backend="cpp", **kw)[0]
    view = tokens[10:500]
    snapshot = view.copy()
    del tokens
    gc.collect()
    other_args, other_kw = _chunk(8, 200)
    out = tokenize_rank(*other_args, backend="cpp", **other_kw)
    np.testing.assert_array_equal(view, snapshot)
    _check(other_args, other_kw, out)


def test_error_then_success():
    args, kw = _chunk(9, 100)
    bad = args[2].copy()
    bad[len(bad) // 2] = np.nan
    for _ in range(3):
        with pytest.raises(CountDataError):
            tokenize_rank(args[0], args[1], bad, backend="cpp", n_threads=2, **kw)
        _check(args, kw, tokenize_rank(*args, backend="cpp", n_threads=2, **kw))


def test_many_threads_allocating_and_freeing():
    chunks = [_chunk(100 + s, n) for s, n in enumerate([30, 250, 80, 400])]
    expected = [rank_tokenize_ref(*args, **kw)[0] for args, kw in chunks]
    errors = []

    def work(t):
        try:
            kept = []
            for r in range(25):
                j = (t + r) % len(chunks)
                args, kw = chunks[j]
                tokens = tokenize_rank(*args, backend="cpp", n_threads=1, **kw)[0]
                kept.append((j, tokens))
                if len(kept) > 2:
                    j0, t0 = kept.pop(0)
                    if not np.array_equal(t0, expected[j0]):
                        errors.append((t, r, j0))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
