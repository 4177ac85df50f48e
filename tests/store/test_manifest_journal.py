"""Shard journal: O(1) shard records, crash-safe resume (torn line, fold crash, SIGKILL), finished layout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from scfm_fast._errors import StoreError
from scfm_fast.store import ShardedTokenWriter, TokenStore, _journal, read_manifest, read_table
from scfm_fast.store.writer import recorded_shards
from tests.store.test_writer_reader import _shard, _write

MAN, JOURNAL = "__scfm__/manifest.json", "__scfm__/manifest.shards.jsonl"


class _Rewriting(ShardedTokenWriter):
    """The writer as it was before the journal: the whole manifest rewritten after every shard."""

    def record(self, name, **k):
        super().record(name, **k)
        self._save()


def _shards(seed, n=4, size=3):
    rng = np.random.default_rng(seed)
    made = [_shard(i * size, list(rng.integers(1, 9, size)), rng) for i in range(n)]
    return [(i * size, t) for i, (t, _) in enumerate(made)], [c for _, cells in made for c in cells]


def _check_cells(out, cells):
    store = TokenStore(out)
    assert len(store) == len(cells)
    for i, want in enumerate(cells):
        np.testing.assert_array_equal(store[i], want)
    assert read_table(out).column("cell_index").to_pylist() == list(range(len(cells)))


def _finish(w, rest, out, cells):
    """Write the remaining shards, finalise, and check the dataset holds exactly ``cells``."""
    _write(w, rest)
    w.finalize()
    _check_cells(out, cells)


def _no_times(man):
    return {k: v for k, v in man.items() if k not in ("created", "updated")}


def test_finished_manifest_is_the_same_as_rewriting_it_per_shard(tmp_path):
    shards, cells = _shards(0)
    mans = []
    for cls, out in ((_Rewriting, tmp_path / "old"), (ShardedTokenWriter, tmp_path / "new")):
        w = cls(out, config={"a": 1}, vocab_size=25_426)
        w.update(inputs=["x.h5ad"])
        _write(w, shards[::-1])  # out of order: records keep the recorded order, as before
        w.finalize(summary={"seconds": 1.0})
        assert not (out / JOURNAL).exists()
        assert sorted(p.name for p in (out / "__scfm__").iterdir()) == ["manifest.json", "packed"]
        mans.append(json.loads((out / MAN).read_text()))
        _check_cells(out, cells)
    assert _no_times(mans[0]) == _no_times(mans[1])
    assert list(mans[0]) == list(mans[1])  # same keys in the same order
    assert [s["start"] for s in mans[1]["shards"]] == [9, 6, 3, 0]


def test_recording_a_shard_appends_one_line_and_leaves_the_manifest_alone(tmp_path):
    out = tmp_path / "o"
    shards, _ = _shards(1, n=6, size=2)
    w = ShardedTokenWriter(out, config={"a": 1})
    before = (out / MAN).read_bytes()
    sizes = []
    for start, tab in shards:
        _write(w, [(start, tab)])
        sizes.append((out / JOURNAL).stat().st_size)
    assert (out / MAN).read_bytes() == before  # never rewritten per shard
    lines = (out / JOURNAL).read_text().splitlines()
    assert [json.loads(x)["start"] for x in lines] == [s for s, _ in shards]
    step = np.diff(sizes)
    assert step.max() - step.min() <= 2  # the same bytes per shard, however many are recorded
    assert [r["file"] for r in recorded_shards(out)] == [r["file"] for r in w.manifest["shards"]]


def test_resume_after_a_crash_with_a_torn_last_journal_line(tmp_path):
    out = tmp_path / "o"
    shards, cells = _shards(2)
    w = ShardedTokenWriter(out, config={"a": 1})
    _write(w, shards[:2])
    # killed while appending the third shard's record: its files are in place, its line is cut short
    start, tab = shards[2]
    w.files.write(tab, f"part-0000-{start:012d}.parquet")
    line = json.dumps({"file": f"part-0000-{start:012d}.parquet", "file_index": 0, "start": start})
    with open(out / JOURNAL, "a") as f:
        f.write(line[:25])
    assert read_manifest(out, require_complete=False)["status"] == "in_progress"
    with pytest.raises(StoreError, match="--resume"):
        ShardedTokenWriter(out, config={"a": 1})  # recorded shards (in the journal) are never cleared
    w2 = ShardedTokenWriter(out, config={"a": 1}, resume=True)
    assert w2.done(0, 0) and w2.done(0, 3) and w2.done(0, 6) is None
    assert not (out / f"part-0000-{start:012d}.parquet").exists()  # unrecorded: a stray, deleted
    assert not (out / JOURNAL).exists()  # folded into the manifest at start
    assert [s["start"] for s in json.loads((out / MAN).read_text())["shards"]] == [0, 3]
    _finish(w2, shards[2:], out, cells)


def test_a_crash_between_manifest_write_and_journal_removal(tmp_path):
    out = tmp_path / "o"
    shards, cells = _shards(3)
    w = ShardedTokenWriter(out, config={"a": 1})
    _write(w, shards[:3])
    journal = (out / JOURNAL).read_bytes()
    w.update(qc={"mode": "x"})  # folds the journal into the manifest ...
    (out / JOURNAL).write_bytes(journal)  # ... and "crashed" before removing it
    w2 = ShardedTokenWriter(out, config={"a": 1}, resume=True)
    assert [s["start"] for s in w2.manifest["shards"]] == [0, 3, 6]  # each once
    _write(w2, shards[3:])
    w2.finalize()
    (out / JOURNAL).write_bytes(journal + b"{damaged\n" + journal)  # the same crash after the final manifest
    _check_cells(out, cells)  # readers use the complete manifest alone
    w3 = ShardedTokenWriter(out, config={"a": 1}, resume=True)
    assert w3.complete and not (out / JOURNAL).exists()
    assert len(read_manifest(out)["shards"]) == 4


def test_an_old_style_unfinished_manifest_still_resumes(tmp_path):
    out = tmp_path / "o"
    shards, cells = _shards(4)
    w = _Rewriting(out, config={"a": 1})
    _write(w, shards[:2])
    assert not (out / JOURNAL).exists() and len(json.loads((out / MAN).read_text())["shards"]) == 2
    w2 = ShardedTokenWriter(out, config={"a": 1}, resume=True)
    assert w2.done(0, 3) and w2.done(0, 6) is None
    _finish(w2, shards[2:], out, cells)


def test_a_damaged_journal_line_before_intact_ones_is_refused(tmp_path):
    out = tmp_path / "o"
    shards, _ = _shards(5)
    _write(ShardedTokenWriter(out, config={"a": 1}), shards[:3])
    lines = (out / JOURNAL).read_text().splitlines(keepends=True)
    (out / JOURNAL).write_text(lines[0] + "{garbage\n" + "".join(lines[2:]))
    with pytest.raises(StoreError, match=r"manifest\.shards\.jsonl: line 2 is damaged.*--overwrite"):
        ShardedTokenWriter(out, config={"a": 1}, resume=True)
    w = ShardedTokenWriter(out, config={"a": 1}, overwrite=True)
    assert w.manifest["shards"] == [] and not (out / JOURNAL).exists()


def test_a_failed_append_records_nothing_and_leaves_no_fragment(tmp_path, monkeypatch):
    out = tmp_path / "o"
    shards, cells = _shards(6)
    w = ShardedTokenWriter(out, config={"a": 1})
    _write(w, shards[:1])
    size = (out / JOURNAL).stat().st_size
    real = os.fsync

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_journal.os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        _write(w, shards[1:2])
    monkeypatch.setattr(_journal.os, "fsync", real)
    assert (out / JOURNAL).stat().st_size == size and w.done(0, 3) is None
    _write(w, shards[1:])  # the run can go on: the journal still parses
    assert [r["start"] for r in recorded_shards(out)] == [0, 3, 6, 9]
    w.finalize()
    _check_cells(out, cells)


_CHILD = """
import sys, numpy as np
from scfm_fast.store import ShardedTokenWriter
from tests.store.test_writer_reader import _shard, _write
rng = np.random.default_rng(0)
w = ShardedTokenWriter(sys.argv[1], config={"a": 1})
for i in range(100_000):
    _write(w, [(3 * i, _shard(3 * i, [2, 3, 1], rng)[0])])
"""


def test_sigkill_during_a_run_resumes_to_a_consistent_dataset(tmp_path):
    out = tmp_path / "o"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), *sys.path])}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(out)], env=env, cwd=Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            j = out / JOURNAL
            if j.exists() and j.read_bytes().count(b"\n") >= 5:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the writer process ended early"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    w = ShardedTokenWriter(out, config={"a": 1}, resume=True)
    starts = sorted(s["start"] for s in w.manifest["shards"])
    assert len(starts) >= 5 and starts == list(range(0, 3 * len(starts), 3))  # recorded in order, none lost
    on_disk = sorted(p.name for p in out.glob("*.parquet"))
    assert on_disk == sorted(s["file"] for s in w.manifest["shards"])  # strays deleted
    w.finalize()
    assert len(TokenStore(out)) == 3 * len(starts)
    assert read_table(out).column("cell_index").to_pylist() == list(range(3 * len(starts)))
