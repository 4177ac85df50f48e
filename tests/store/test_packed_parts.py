"""Packed parts: written from the shard table, copied file to file into the packed store."""

from __future__ import annotations

import errno
import os

import numpy as np
import pyarrow as pa
import pytest

from scfm_fast.store import ShardedTokenWriter, TokenStore
from scfm_fast.store.packed import part_dir


def _table(rng, start, lengths, *, values=False):
    toks = [rng.integers(2, 25_000, n).astype(np.int32) for n in lengths]
    cols = {
        "input_ids": pa.array(toks, type=pa.list_(pa.int32())),
        "length": pa.array(np.array(lengths, dtype=np.int32)),
        "cell_index": pa.array(np.arange(start, start + len(lengths), dtype=np.int64)),
        "file_index": pa.array(np.zeros(len(lengths), dtype=np.int32)),
        "cell_id": pa.array([f"c{start + i}" for i in range(len(lengths))]),
    }
    vals = [rng.random(n, dtype=np.float32) for n in lengths]
    if values:
        cols["values"] = pa.array(vals, type=pa.list_(pa.float32()))
        cols["species"] = pa.array(np.ones(len(lengths), dtype=np.int8))
    return pa.table(cols), toks, vals


def _run(out, tables):
    w = ShardedTokenWriter(out, config={"a": 1}, vocab_size=25_426)
    for start, tab in tables:
        w.write_shard(tab, file_index=0, start=start, stop=start + tab.num_rows,
                      stats={"n_tokens": int(tab.column("length").to_numpy().sum())})
    return w


@pytest.mark.parametrize("copy_range", [True, False])
def test_packed_store_equals_the_shards(tmp_path, monkeypatch, copy_range):
    if not copy_range:  # e.g. another file system: the read/write fallback gives the same store
        def refuse(*_a, **_k):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    rng = np.random.default_rng(0)
    (t0, a, va), (t1, b, vb) = _table(rng, 0, [5, 1, 3], values=True), _table(rng, 3, [2000, 2], values=True)
    # a shard table that is a slice of a bigger one: its list offsets do not start at 0
    t1 = pa.concat_tables([t0, t1]).combine_chunks().slice(3)
    w = _run(tmp_path / "o", [(0, t0), (3, t1)])
    w.finalize()
    s = TokenStore(tmp_path / "o")
    assert s.tokens.dtype == np.uint16 and len(s) == 5
    for i, (want, want_v) in enumerate(zip(a + b, va + vb, strict=True)):
        np.testing.assert_array_equal(s[i], want)
        np.testing.assert_array_equal(s.cell_values(i), want_v)
    assert s.cell_index.tolist() == [0, 1, 2, 3, 4]
    assert not (tmp_path / "o" / "__scfm__" / "parts").exists()


def test_resume_rebuilds_parts_of_an_older_layout_from_parquet(tmp_path):
    rng = np.random.default_rng(1)
    (t0, a, _), (t1, b, _) = _table(rng, 0, [4, 2]), _table(rng, 2, [3])
    out = tmp_path / "o"
    _run(out, [(0, t0), (2, t1)])
    parts = out / "__scfm__" / "parts"
    old = part_dir(parts, "part-0000-000000000002.parquet")
    for p in old.iterdir():
        p.unlink()
    old.rmdir()
    (parts / "part-0000-000000000002.npz").write_bytes(b"an older run's part")
    w = ShardedTokenWriter(out, config={"a": 1}, vocab_size=25_426, resume=True)
    assert not (parts / "part-0000-000000000002.npz").exists() and old.is_dir()
    w.finalize()
    s = TokenStore(out)
    for i, want in enumerate(a + b):
        np.testing.assert_array_equal(s[i], want)


def test_a_part_that_disagrees_with_the_manifest_is_refused(tmp_path):
    from scfm_fast._errors import StoreError

    rng = np.random.default_rng(2)
    t0, _, _ = _table(rng, 0, [4, 2])
    out = tmp_path / "o"
    w = _run(out, [(0, t0)])
    tokens = part_dir(out / "__scfm__" / "parts", "part-0000-000000000000.parquet") / "tokens.npy"
    np.save(tokens, np.zeros(5, dtype=np.uint16))  # one token short
    with pytest.raises(StoreError, match="does not match the manifest"):
        w.finalize()
    assert not (out / "__scfm__" / "packed").exists()
