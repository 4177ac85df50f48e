"""Partitioned, resumable runs: atomic parts, config comparison, overwrite, ranks, one merge."""

from __future__ import annotations

import json

import pytest

from scfm_fast._errors import StoreError, UsageError
from scfm_fast._runs import PartitionedRun, atomic_write, rank_world


def _run(out, *, n_parts=3, rank=0, world=1, **kw):
    cfg = kw.pop("config", {"layer": -1, "model": "m"})
    return PartitionedRun(out, config=cfg, n_parts=n_parts, outputs=["merged.txt"], rank=rank, world=world,
                          command="scfm test", **kw)


def _work(run):
    for p in run.todo():
        run.write_part(p, lambda t, p=p: t.write_text(f"part {p}"), side={".extra": lambda t: t.write_text("x")})


def _finish(run):
    with run.merging() as mine:
        if mine:
            run.check_merge_ready()
            (run.out / "merged.txt").write_text("".join(p.read_text() for p in run.part_paths()))
            run.complete(n=3)
        return mine


def test_a_run_writes_parts_merges_once_and_completes(tmp_path):
    run = _run(tmp_path / "o")
    run.begin()
    assert run.info()["status"] == "running" and run.todo() == [0, 1, 2]
    _work(run)
    assert run.all_done() and run.todo() == []
    assert all(p.with_suffix(".extra").exists() for p in run.part_paths())  # side files before the part
    assert _finish(run)
    assert (tmp_path / "o/merged.txt").read_text() == "part 0part 1part 2"
    info = json.loads((tmp_path / "o/run_info.json").read_text())
    assert info["status"] == "complete" and info["n"] == 3 and info["config"] == {"layer": -1, "model": "m"}
    assert not _finish(run)  # complete with its outputs: nothing to merge again
    assert not list((tmp_path / "o").rglob("*.tmp"))


def test_resume_keeps_parts_and_refusals_name_the_difference(tmp_path):
    out = tmp_path / "o"
    run = _run(out)
    run.begin()
    run.write_part(0, lambda t: t.write_text("first"))
    with pytest.raises(StoreError, match="pass --resume"):
        _run(out).begin()
    with pytest.raises(StoreError, match="layer: -1 -> -2"):
        _run(out, resume=True, config={"layer": -2, "model": "m"}).begin()
    again = _run(out, resume=True)
    again.begin()
    assert again.todo() == [1, 2] and again.part_path(0).read_text() == "first"
    fresh = _run(out, overwrite=True, config={"layer": -2, "model": "m"})
    fresh.begin()
    assert fresh.todo() == [0, 1, 2] and fresh.info()["config"]["layer"] == -2


def test_a_run_that_wrote_nothing_does_not_block_the_corrected_rerun(tmp_path):
    out = tmp_path / "o"
    _run(out, config={"model": "broken"}).begin()  # then failed before its first part
    run = _run(out, config={"model": "fixed"})
    run.begin()
    assert run.info()["config"] == {"model": "fixed"}


def test_parts_are_atomic_and_stale_temporaries_go(tmp_path):
    run = _run(tmp_path / "o")
    run.begin()

    def fails(t):
        t.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run.write_part(1, fails)
    assert not run.done(1) and not list(run.parts.glob(".*"))
    (run.parts / ".part-000002.parquet.999.tmp").write_text("killed")  # a killed process's temporary
    _run(tmp_path / "o", resume=True).begin()
    assert not list(run.parts.glob(".*"))
    with pytest.raises(StoreError, match=r"parts \['part-000000.parquet'"):
        run.check_merge_ready()
    target = tmp_path / "x.txt"
    atomic_write(target, lambda t: t.write_text("ok"))
    assert target.read_text() == "ok" and len(list(tmp_path.glob(".*"))) == 0


def test_ranks_share_the_parts_and_the_last_one_merges(tmp_path):
    out = tmp_path / "o"
    r1 = _run(out, n_parts=5, rank=1, world=2)
    with pytest.raises(StoreError, match="rank 1 waited"):
        r1.begin(wait_s=0.2)  # rank 0 has not prepared the run
    r0 = _run(out, n_parts=5, rank=0, world=2)
    r0.begin()
    r1.begin(wait_s=5)
    assert r0.todo() == [0, 2, 4] and r1.todo() == [1, 3]
    _work(r0)
    assert not _finish(r0)  # rank 1's parts are missing: no merge yet
    _work(r1)
    with r0.merging() as mine0, r1.merging() as mine1:
        assert mine0 and not mine1  # one merge at a time: the lock holder merges
    r0.wait_all(timeout_s=1)
    assert _finish(r1) and r1.info()["status"] == "complete"
    r0.part_path(3).unlink()
    with pytest.raises(StoreError, match=r"parts \['part-000003.parquet'\] never appeared"):
        r0.wait_all(timeout_s=0.1, poll_s=0.05)


def test_status_files_carry_extra_fields(tmp_path):
    run = _run(tmp_path / "o", n_parts=1, info_extra={"format": "scfm_fast.test/1"})
    run.begin()
    assert run.info()["format"] == "scfm_fast.test/1" and run.info()["status"] == "running"
    _work(run)
    assert _finish(run) and run.info()["format"] == "scfm_fast.test/1"


def test_rank_world_from_torchrun_or_devices():
    assert rank_world(env={}) == (0, 1)
    assert rank_world(env={"RANK": "3", "WORLD_SIZE": "4"}) == (3, 4)
    assert rank_world(devices=["cuda:0", "cuda:1"], rank=1) == (1, 2)
    with pytest.raises(UsageError, match="rank 4 of world size 4"):
        rank_world(env={"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(UsageError, match="at least one part"):
        PartitionedRun("x", config={}, n_parts=0)
