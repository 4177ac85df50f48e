"""Shard files written past the page cache (``O_DIRECT``), where the file system allows it.

A tokenize run writes ~10 bytes per token (Parquet int32 + packed uint16), ~2 GB per 200,000 cells,
and never reads it back during the run.  Through the page cache, each written page is first allocated
and filled by the kernel: on the 2-core benchmark VM that was the largest single cost of a run (22% of
its CPU in one profile; 0.3-4.5 CPU s per GB, depending on whether the host had to back fresh guest
pages), while the same bytes written with ``O_DIRECT`` from reused, page-aligned staging blocks cost
~0.05 CPU s per GB (the device, not the CPU, does the copy).

:class:`ShardSink` is a write-only binary file that pyarrow and NumPy write into.  It stages writes in
two 8 MiB aligned blocks: while one fills, the other is written with ``O_DIRECT`` on a background
thread (``pwrite`` releases the GIL), so the device's time overlaps encoding.  The last, partial block
is written through the page cache.  Where ``O_DIRECT`` is refused (tmpfs, some network or FUSE file
systems, non-Linux) it writes through the page cache like a plain file, so the bytes on disk are the
same either way.  ``SCFM_FAST_DIRECT_IO=0`` turns it off.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import io
import mmap
import os
import threading
from pathlib import Path

import numpy as np

#: staging block: a multiple of every logical block size O_DIRECT may require (512 B - 4 KiB)
BLOCK = 8 << 20
_ALIGN = 4096
#: errors of an O_DIRECT open or write that mean "not here": write through the page cache instead
_NO_DIRECT = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM, errno.EFAULT}

_local = threading.local()
_io_pool: tuple[int, cf.ThreadPoolExecutor] | None = None  # (pid, pool): a forked child makes its own
_io_lock = threading.Lock()


def direct_io_enabled() -> bool:
    """Whether shard files are written with ``O_DIRECT`` where possible (``SCFM_FAST_DIRECT_IO``, default on)."""
    return hasattr(os, "O_DIRECT") and os.environ.get("SCFM_FAST_DIRECT_IO", "1") != "0"


def _pool() -> cf.ThreadPoolExecutor:
    global _io_pool  # noqa: PLW0603 - one I/O thread per process, made on first use
    with _io_lock:
        if _io_pool is None or _io_pool[0] != os.getpid():
            _io_pool = (os.getpid(), cf.ThreadPoolExecutor(1, thread_name_prefix="scfm-direct-io"))
        return _io_pool[1]


def _free_blocks() -> list[mmap.mmap]:
    """This thread's free staging blocks; a forked child starts with none of its parent's."""
    if getattr(_local, "pid", None) != os.getpid():
        _local.pid, _local.free = os.getpid(), []
    return _local.free


def _take_staging() -> mmap.mmap:
    """A page-aligned staging block of this thread, reused from sink to sink (its pages stay resident:
    no fresh page per shard).  Private, not Python's default shared anonymous map: a forked worker must
    never write into its parent's or a sibling's block."""
    free = _free_blocks()
    return free.pop() if free else mmap.mmap(-1, BLOCK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _give_back_staging(buf: mmap.mmap) -> None:
    free = _free_blocks()
    if len(free) < 4:
        free.append(buf)
    else:
        buf.close()


def _pwrite_all(fd: int, mv: memoryview, pos: int) -> int:
    """Write all of ``mv`` at ``pos``; returns the end position."""
    while len(mv):
        done = os.pwrite(fd, mv, pos)
        pos += done
        mv = mv[done:]
    return pos


class ShardSink(io.RawIOBase):
    """A new file at ``path``, written sequentially (truncated first); see the module docstring.

    Parameters
    ----------
    path
        The file to create or truncate.
    direct
        Try ``O_DIRECT`` (default: :func:`direct_io_enabled`).
    """

    def __init__(self, path: str | Path, *, direct: bool | None = None) -> None:
        super().__init__()
        self.name = str(path)
        cloexec = getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | cloexec, 0o666)
        self._dfd = -1
        if direct_io_enabled() if direct is None else direct:
            try:
                self._dfd = os.open(self.name, os.O_WRONLY | os.O_DIRECT | cloexec)
            except OSError as e:
                if e.errno not in _NO_DIRECT:
                    os.close(self._fd)
                    raise
        self._bufs: list[mmap.mmap] = []
        self._pending: list[cf.Future | None] = []
        self._cur = 0          # staging block being filled
        self._n = 0            # bytes staged in it
        self._pos = 0          # file offset of the staged bytes
        if self._dfd >= 0:
            self._bufs = [_take_staging(), _take_staging()]
            self._pending = [None, None]

    @property
    def direct(self) -> bool:
        """Whether blocks still go past the page cache."""
        return self._dfd >= 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos + self._n

    def write(self, b) -> int:  # noqa: ANN001 - any buffer
        mv = memoryview(b).cast("B")
        total = len(mv)
        if not self._bufs:
            self._pos = _pwrite_all(self._fd, mv, self._pos)
            return total
        while len(mv):
            take = min(len(mv), BLOCK - self._n)
            self._bufs[self._cur][self._n:self._n + take] = mv[:take]
            self._n += take
            mv = mv[take:]
            if self._n == BLOCK:
                self._submit()
        return total

    def write_converted(self, a: np.ndarray, dtype: np.dtype) -> int:
        """Write 1-D ``a`` converted to ``dtype`` (its bytes in C order), converted straight into the
        staging blocks: no converted copy of the whole array (for a shard's tokens, int32 -> uint16, a
        fresh ~30 MiB array, its page faults and one more copy).  Returns the number of bytes written."""
        dtype = np.dtype(dtype)
        a = np.asarray(a).reshape(-1)
        size = dtype.itemsize
        if not self._bufs:
            # no staging blocks: convert in pieces of one block (no whole-array copy)
            step = max(1, BLOCK // size)
            for i in range(0, a.size, step):
                self.write(memoryview(np.ascontiguousarray(a[i:i + step], dtype=dtype)).cast("B"))
            return a.size * size
        i = 0
        while i < a.size:
            room = (BLOCK - self._n) // size
            if room == 0:  # an element straddles two blocks: through write()
                self.write(memoryview(np.ascontiguousarray(a[i:i + 1], dtype=dtype)).cast("B"))
                i += 1
                continue
            take = min(room, a.size - i)
            dst = np.frombuffer(self._bufs[self._cur], dtype=dtype, count=take, offset=self._n)
            np.copyto(dst, a[i:i + take], casting="unsafe")  # as np.asarray(a, dtype) converts
            del dst  # no view of the block may outlive this write (the block is reused, then closed)
            self._n += take * size
            i += take
            if self._n == BLOCK:
                self._submit()
        return a.size * size

    def _submit(self) -> None:
        """Hand the full staging block to the I/O thread and continue in the other one."""
        k = self._cur
        self._pending[k] = _pool().submit(self._write_block, k, self._n, self._pos)
        self._pos += self._n
        self._n = 0
        self._cur = 1 - k
        self._wait(self._cur)  # its previous write must be done before it is refilled

    def _wait(self, k: int) -> None:
        fut, self._pending[k] = self._pending[k], None
        if fut is not None:
            fut.result()  # re-raises the write's error (e.g. a full disk)

    def _write_block(self, k: int, n: int, pos: int) -> None:
        """Write ``n`` staged bytes of block ``k`` at ``pos``: aligned whole pages with O_DIRECT, any tail
        (only the file's last block has one) through the page cache."""
        with memoryview(self._bufs[k]) as view:
            staged = view[:n]
            aligned = n - n % _ALIGN
            dfd = self._dfd
            if dfd >= 0 and aligned:
                try:
                    done = _pwrite_all(dfd, staged[:aligned], pos)
                except OSError as e:
                    if e.errno not in _NO_DIRECT:
                        raise
                    self._dfd = -1  # refused after all: later blocks go through the page cache
                    os.close(dfd)
                    done = pos
                staged, pos = staged[done - pos:], done
            _pwrite_all(self._fd, staged, pos)
            staged.release()

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._bufs:
                for k in (0, 1):
                    self._wait(k)
                if self._n:
                    self._write_block(self._cur, self._n, self._pos)
                    self._pos += self._n
                    self._n = 0
        finally:
            for k in range(len(self._pending)):  # after an error: no write may still use a block
                fut = self._pending[k]
                if fut is not None:
                    cf.wait([fut])
            if self._dfd >= 0:
                os.close(self._dfd)
                self._dfd = -1
            os.close(self._fd)
            for buf in self._bufs:
                _give_back_staging(buf)
            self._bufs = []
            super().close()
