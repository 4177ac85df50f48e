"""``ShardSink`` writes exactly the bytes a plain file would, with or without ``O_DIRECT``."""

from __future__ import annotations

import errno
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scfm_fast.store import _direct
from scfm_fast.store._direct import BLOCK, ShardSink


def _pieces(rng, sizes):
    return [rng.integers(0, 256, n).astype(np.uint8).tobytes() for n in sizes]


@pytest.mark.parametrize("sizes", [[], [1], [4096], [4097], [BLOCK], [BLOCK + 1], [3, BLOCK - 3, 4096, 17],
                                   [BLOCK * 2 + 5000], [700_000] * 30])
@pytest.mark.parametrize("direct", [True, False])
def test_bytes_equal_a_plain_write(tmp_path, sizes, direct):
    data = _pieces(np.random.default_rng(len(sizes)), sizes)
    with ShardSink(tmp_path / "f", direct=direct) as f:
        for b in data:
            assert f.write(b) == len(b)
        assert f.tell() == sum(map(len, data))
    assert (tmp_path / "f").read_bytes() == b"".join(data)


@pytest.mark.parametrize("lead", [0, 1, 64])  # bytes before the array: 1 makes an element straddle two blocks
@pytest.mark.parametrize("n", [0, 1, BLOCK // 2 + 3])  # the last: 2 (uint16) or 4 (4-byte) blocks
@pytest.mark.parametrize(("src", "dst"), [(np.int32, np.uint16), (np.float64, np.float32), (np.int32, np.int32)])
@pytest.mark.parametrize("direct", [True, False])
def test_write_converted_writes_the_converted_arrays_bytes(tmp_path, lead, n, src, dst, direct):
    rng = np.random.default_rng(n + lead)
    a = (rng.integers(0, 60_000, n) if np.dtype(src).kind == "i" else rng.random(n) * 1e3).astype(src)
    with ShardSink(tmp_path / "f", direct=direct) as f:
        f.write(b"h" * lead)
        assert f.write_converted(a, dst) == n * np.dtype(dst).itemsize
        f.write(b"tail")
        assert f.tell() == lead + n * np.dtype(dst).itemsize + 4
    assert (tmp_path / "f").read_bytes() == b"h" * lead + np.asarray(a, dtype=dst).tobytes() + b"tail"


def test_truncates_an_existing_file_and_is_read_by_pyarrow_and_numpy(tmp_path):
    (tmp_path / "t.parquet").write_bytes(b"x" * (BLOCK + 99))  # longer than what follows
    tab = pa.table({"input_ids": pa.array([np.arange(n, dtype=np.int32) for n in (5, 0, 3000)] * 500)})
    with ShardSink(tmp_path / "t.parquet") as f:
        pq.write_table(tab, f)
    pq.write_table(tab, tmp_path / "plain.parquet")
    assert pq.read_table(tmp_path / "t.parquet").equals(tab)
    assert (tmp_path / "t.parquet").read_bytes() == (tmp_path / "plain.parquet").read_bytes()
    a = np.arange(1_000_003, dtype=np.uint16)
    with ShardSink(tmp_path / "a.npy") as f:
        np.save(f, a)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), a)


def test_falls_back_to_the_page_cache_when_direct_writes_are_refused(tmp_path, monkeypatch):
    data = _pieces(np.random.default_rng(0), [2 * BLOCK + 12345, 77])
    real, refuse, calls = os.pwrite, set(), []

    def pwrite(fd, b, pos):
        if fd in refuse:
            calls.append(pos)
            raise OSError(errno.EINVAL, "no O_DIRECT here")
        return real(fd, b, pos)

    monkeypatch.setattr(_direct.os, "pwrite", pwrite)
    with ShardSink(tmp_path / "f", direct=True) as f:
        was_direct = f.direct
        if was_direct:
            refuse.add(f._dfd)
        for b in data:
            f.write(b)
    assert (tmp_path / "f").read_bytes() == b"".join(data)
    assert calls == ([0] if was_direct else [])  # refused once, then never tried again


def test_direct_io_can_be_turned_off(monkeypatch, tmp_path):
    monkeypatch.setenv("SCFM_FAST_DIRECT_IO", "0")
    assert not _direct.direct_io_enabled()
    with ShardSink(tmp_path / "f") as f:
        assert not f.direct
        f.write(b"abc")
    assert (tmp_path / "f").read_bytes() == b"abc"


def test_a_forked_worker_never_writes_into_its_parents_staging_blocks(tmp_path):
    # worker processes are forked from the run's parent: a staging block shared with it (Python's default
    # anonymous map is MAP_SHARED) let two workers overwrite each other's shards
    block = _direct._take_staging()
    block[:4] = b"AAAA"
    _direct._give_back_staging(block)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            with ShardSink(tmp_path / "child", direct=True) as f:
                f.write(b"B" * (BLOCK + 10))
            os._exit(0)
        except BaseException:
            os._exit(1)
    assert os.waitpid(pid, 0)[1] == 0
    assert (tmp_path / "child").read_bytes() == b"B" * (BLOCK + 10)
    assert block[:4] == b"AAAA"


@pytest.mark.parametrize("direct", [True, False])
def test_a_write_error_is_raised_and_no_descriptor_leaks(tmp_path, monkeypatch, direct):
    # e.g. a full disk, met on the I/O thread (direct) or in the caller (page cache)
    real = os.pwrite
    monkeypatch.setattr(_direct.os, "pwrite",
                        lambda fd, b, pos: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="No space left"):  # noqa: PT012 - the error may come from write or close
        with ShardSink(tmp_path / "f", direct=direct) as f:
            for _ in range(3):
                f.write(b"x" * BLOCK)
    monkeypatch.setattr(_direct.os, "pwrite", real)
    assert f.closed and len(os.listdir("/proc/self/fd")) == before
