"""One writer per output directory: an exclusive ``flock`` held for a whole run.

Lock files (content is informative only: pid, host, command, start time)::

    token dataset (scfm tokenize)          DIR/__scfm__/lock
    medians / embed / perturb output       DIR/.scfm.lock

The kernel releases a ``flock`` when its process dies (SIGKILL, OOM, node reboot of a local disk),
so a lock file left by a dead run is simply taken over.  On release the holder unlinks the file
while still holding the lock; a waiter that had opened the old file notices (its inode is no longer
the one at the path) and tries again, so two processes never both believe they hold the lock.
``flock`` is not reliable on some network file systems (old NFS): there the lock is advisory only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ._errors import StoreError

#: lock file of a token dataset, relative to its directory (inside the metadata folder)
TOKENS_LOCK = "__scfm__/lock"
#: lock file of the other commands' output directories
DEFAULT_LOCK = ".scfm.lock"


class OutputLock:
    """Exclusive, non-blocking lock on an output directory.

    Parameters
    ----------
    out_dir
        The output directory (created when missing; removed again on release if the run left it empty).
    command
        The command holding the lock, for the message a refused second writer gets.
    lock_name
        Path of the lock file relative to ``out_dir``.
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, command: str, lock_name: str = DEFAULT_LOCK) -> None:
        self.out = Path(out_dir)
        self.command = command
        self.path = self.out / lock_name
        self._fd: int | None = None
        self._created: list[Path] = []

    def acquire(self) -> OutputLock:
        """Take the lock or raise :class:`StoreError` naming the process that holds it."""
        if self._fd is not None:
            return self
        if self.out.exists() and not self.out.is_dir():
            msg = f"{self.out}: is a file; --out must be a directory (new, empty, or this command's output)"
            raise StoreError(msg)
        self._created = [d for d in (*reversed(self.path.parents),) if d not in self.out.parents and not d.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                msg = (f"another scfm {holder.get('command', '?')} (pid {holder.get('pid', '?')} on "
                       f"{holder.get('host', '?')}) is writing {self.out}; wait for it to finish (or stop it), "
                       "or choose another --out")
                raise StoreError(msg) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder unlinked it while we waited: lock the current file instead
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (no-op if not held); remove the lock file and directories it created if empty."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None
        for d in reversed(self._created):
            with contextlib.suppress(OSError):
                d.rmdir()  # only succeeds when the run left it empty

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def output_lock(out_dir: str | os.PathLike[str], *, command: str,
                lock_name: str = DEFAULT_LOCK) -> Iterator[OutputLock]:
    """Hold the exclusive lock of ``out_dir`` for the body of a ``with`` block.

    Parameters
    ----------
    out_dir
        Output directory.
    command
        Name of the command (``"tokenize"``, ``"embed"``...), recorded in the lock file.
    lock_name
        Lock file relative to ``out_dir`` (:data:`TOKENS_LOCK` for token datasets).

    Raises
    ------
    StoreError
        Another live process holds the lock: "another scfm CMD (pid N on HOST) is writing DIR".
    """
    lock = OutputLock(out_dir, command=command, lock_name=lock_name)
    with lock:
        yield lock
