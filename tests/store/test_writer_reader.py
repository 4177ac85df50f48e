"""Sharded writer: atomic shards, manifest status, resume rules, packed store round trip."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pytest

from scfm_fast._errors import StoreError
from scfm_fast.store import ShardedTokenWriter, TokenStore, read_manifest, read_table


def _shard(start, lengths, rng):
    toks = [rng.integers(2, 60_000, n).astype(np.int32) for n in lengths]
    return pa.table({
        "input_ids": pa.array(toks, type=pa.list_(pa.int32())),
        "length": pa.array(np.array(lengths, dtype=np.int32)),
        "cell_index": pa.array(np.arange(start, start + len(lengths), dtype=np.int64)),
        "file_index": pa.array(np.zeros(len(lengths), dtype=np.int32)),
        "cell_id": pa.array([f"c{start + i}" for i in range(len(lengths))]),
    }), toks


def _write(w, shards):
    for start, tab in shards:
        w.write_shard(tab, file_index=0, start=start, stop=start + tab.num_rows,
                      stats={"n_tokens": int(np.sum(tab.column("length").to_numpy()))})


def test_round_trip_packed_and_table(tmp_path):
    rng = np.random.default_rng(0)
    (t0, a), (t1, b) = _shard(0, [5, 1, 3], rng), _shard(3, [7, 2], rng)
    w = ShardedTokenWriter(tmp_path / "o", config={"x": 1}, vocab_size=25_426)
    _write(w, [(3, t1), (0, t0)])  # out of order on purpose
    with pytest.raises(StoreError, match="unfinished"):
        TokenStore(tmp_path / "o")
    w.finalize()
    store = TokenStore(tmp_path / "o")
    assert store.tokens.dtype == np.uint16
    assert len(store) == 5 and store.lengths.tolist() == [5, 1, 3, 7, 2]
    for got, want in zip((store[i] for i in range(5)), a + b):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(store[-1], b[-1])
    assert store.cell_index.tolist() == [0, 1, 2, 3, 4]
    tab = read_table(tmp_path / "o")
    assert tab.column("cell_index").to_pylist() == [0, 1, 2, 3, 4]
    assert read_manifest(tmp_path / "o")["n_tokens"] == 18


def test_large_vocab_packs_int32(tmp_path):
    rng = np.random.default_rng(1)
    t0, a = _shard(0, [3], rng)
    w = ShardedTokenWriter(tmp_path / "o", config={}, vocab_size=70_000)
    _write(w, [(0, t0)])
    w.finalize()
    s = TokenStore(tmp_path / "o")
    assert s.tokens.dtype == np.int32
    np.testing.assert_array_equal(s[0], a[0])


def test_resume_rules(tmp_path):
    rng = np.random.default_rng(2)
    out = tmp_path / "o"
    t0, _ = _shard(0, [2, 2], rng)
    w = ShardedTokenWriter(out, config={"a": 1})
    _write(w, [(0, t0)])
    (out / ".part-0000-000000000002.parquet.tmp").write_bytes(b"half")  # a crash mid-write
    (out / "part-0000-000000000009.parquet").write_bytes(b"orphan")  # written, never recorded
    with pytest.raises(StoreError, match="--resume"):
        ShardedTokenWriter(out, config={"a": 1})
    with pytest.raises(StoreError, match="different inputs or options"):
        ShardedTokenWriter(out, config={"a": 2}, resume=True)
    w2 = ShardedTokenWriter(out, config={"a": 1}, resume=True)
    assert w2.done(0, 0) is not None and w2.done(0, 2) is None
    assert not (out / ".part-0000-000000000002.parquet.tmp").exists()
    assert not (out / "part-0000-000000000009.parquet").exists()
    t1, _ = _shard(2, [4], rng)
    _write(w2, [(2, t1)])
    w2.finalize()
    assert len(TokenStore(out)) == 3
    assert json.loads((out / "__scfm__/manifest.json").read_text())["status"] == "complete"
    w3 = ShardedTokenWriter(out, config={"b": 0}, overwrite=True)
    assert w3.manifest["shards"] == []


def test_not_a_token_dataset(tmp_path):
    with pytest.raises(StoreError, match="scfm tokenize"):
        TokenStore(tmp_path)
    (tmp_path / "x").write_text("1")
    with pytest.raises(StoreError, match="no __scfm__/manifest.json"):
        ShardedTokenWriter(tmp_path, config={}, resume=True)


def _one_shard(out, seed):
    t0, a = _shard(0, [3, 4], np.random.default_rng(seed))
    w = ShardedTokenWriter(out, config={"a": 1})
    _write(w, [(0, t0)])
    return w, a


def test_finalize_links_the_parts_tokens_instead_of_copying_them(tmp_path):
    out = tmp_path / "o"
    w, a = _one_shard(out, 4)
    part = out / "__scfm__" / "parts" / "part-0000-000000000000.part" / "tokens.npy"
    inode = part.stat().st_ino
    man = w.finalize()
    seg = out / "__scfm__" / "packed" / "tokens" / "part-0000-000000000000.npy"
    assert seg.stat().st_ino == inode and not part.exists()
    assert man["packed"]["layout"] == "segments" and man["format"] == "scfm_fast.tokens/2"
    s = TokenStore(out)
    assert [s[i].tolist() for i in range(len(s))] == [np.asarray(x).tolist() for x in a]


def test_resume_of_a_complete_run_changes_nothing(tmp_path):
    out = tmp_path / "o"
    w, a = _one_shard(out, 3)
    w.finalize()
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    w2 = ShardedTokenWriter(out, config={"a": 1}, resume=True)
    assert w2.complete and w2.done(0, 0) is not None
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files
    np.testing.assert_array_equal(TokenStore(out)[1], a[1])


def test_finalize_failure_names_the_cause_and_can_be_resumed(tmp_path):
    out = tmp_path / "o"
    w, a = _one_shard(out, 4)
    part = next((out / "__scfm__").rglob("tokens.npy"))
    saved = part.read_bytes()
    part.unlink()
    # the missing part is reported, not a follow-on "wrote 0 of N elements"
    with pytest.raises(FileNotFoundError, match=re.escape(str(part))):
        w.finalize()
    assert read_manifest(out, require_complete=False)["status"] == "in_progress"
    part.write_bytes(saved)
    w2 = ShardedTokenWriter(out, config={"a": 1}, resume=True)
    assert not w2.complete
    w2.finalize()
    np.testing.assert_array_equal(TokenStore(out)[0], a[0])


def test_overwrite_only_replaces_a_token_dataset(tmp_path):
    # --out pointing at a folder of inputs must never delete them
    (tmp_path / "cells.h5ad").write_bytes(b"precious")
    with pytest.raises(StoreError, match=r"--overwrite refused.*cells\.h5ad"):
        ShardedTokenWriter(tmp_path, config={}, overwrite=True)
    with pytest.raises(StoreError, match="not a token dataset"):
        ShardedTokenWriter(tmp_path, config={})
    assert (tmp_path / "cells.h5ad").read_bytes() == b"precious"
    with pytest.raises(StoreError, match="is a file"):
        ShardedTokenWriter(tmp_path / "cells.h5ad", config={})
    out = tmp_path / "o"
    _one_shard(out, 5)[0].finalize()
    assert ShardedTokenWriter(out, config={"a": 2}, overwrite=True).manifest["shards"] == []


def test_refused_resume_names_the_changed_options(tmp_path):
    _one_shard(tmp_path / "o", 6)
    with pytest.raises(StoreError, match=r"a: 1 -> 2; b: None -> 'x'"):
        ShardedTokenWriter(tmp_path / "o", config={"a": 2, "b": "x"}, resume=True)


def test_a_run_that_wrote_no_shard_is_replaced(tmp_path):
    # e.g. stopped on bad counts in its first chunk: the corrected rerun needs no --overwrite
    ShardedTokenWriter(tmp_path / "o", config={"layer": None})
    w = ShardedTokenWriter(tmp_path / "o", config={"layer": "counts"})
    assert w.manifest["config"] == {"layer": "counts"}


def test_missing_packed_store_is_a_store_error(tmp_path):
    import shutil

    out = tmp_path / "o"
    w, _ = _one_shard(out, 5)
    w.finalize()
    shutil.rmtree(out / "__scfm__" / "packed")
    with pytest.raises(StoreError, match="packed token store is missing"):
        TokenStore(out)
    assert read_table(out).num_rows == 2  # the shards still read


def test_a_journal_that_cannot_be_removed_does_not_fail_a_finished_run(tmp_path, monkeypatch, caplog):
    import pathlib

    out = tmp_path / "o"
    w, a = _one_shard(out, 5)
    real = pathlib.Path.unlink

    def unlink(self, missing_ok=False):
        if self.name == "manifest.shards.jsonl":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, missing_ok=missing_ok)

    monkeypatch.setattr(pathlib.Path, "unlink", unlink)
    with caplog.at_level("WARNING", logger="scfm_fast"):
        man = w.finalize()
    assert man["status"] == "complete" and "could not remove the shard journal" in caplog.text
    journal = out / "__scfm__" / "manifest.shards.jsonl"
    assert journal.exists()  # left behind, records also in the manifest
    s = TokenStore(out)
    assert [s[i].tolist() for i in range(len(s))] == [np.asarray(x).tolist() for x in a]
    monkeypatch.setattr(pathlib.Path, "unlink", real)
    w2 = ShardedTokenWriter(out, config={"a": 1}, resume=True)  # a later resume tidies it
    assert w2.complete and not journal.exists()
