"""Partitioned, resumable runs: one implementation for ``scfm embed`` (and next ``perturb``, ``pretrain``).

A run writes ``n_parts`` part files under ``OUT/<parts_dir>/`` and, when every part exists, merges
them into the final outputs. The rules, in one place:

- **Atomic parts**: a part is written under a hidden per-process temporary name and renamed into place
  (its side files first, the part itself last), so a part that exists is complete.
- **Status**: ``OUT/<info>`` (JSON) holds the run's ``config`` and ``status``: ``"running"`` while parts
  are written or merged, ``"complete"`` once the merged outputs are in place.
- **Resume**: ``resume=True`` keeps finished parts if the recorded config equals this one; otherwise
  the refusal names every key that differs (``key: old -> new``). A run that failed before writing any
  part or output holds nothing to lose: a corrected rerun starts over without ``--resume``/``--overwrite``.
- **Partitioning**: :func:`rank_world` reads ``RANK``/``WORLD_SIZE`` (torchrun) or takes them from
  ``--devices`` workers; rank ``r`` of ``w`` writes the parts ``p`` with ``p % w == r``. Rank 0 prepares
  ``OUT`` (and applies ``--overwrite``); the other ranks wait for its info file. Whichever rank finds
  every part done merges, under an exclusive lock, so exactly one merge runs; a command whose rank 0
  (or ``--devices`` parent, which calls :meth:`PartitionedRun.begin` as rank 0 before starting its
  workers) must merge waits with :meth:`PartitionedRun.wait_all` instead.

Layouts differ only by names: ``scfm embed`` uses ``embed_info.json`` + ``parts/part-PPPPPP.parquet`` (+ a
``.genes.npz`` side file); ``scfm perturb`` would use ``info_name="manifest.json"``, ``parts_dir="shards"``,
a ``.json`` side file per shard and ``info_extra={"format": "scfm_fast.perturb/1"}``.

Example
-------
>>> run = PartitionedRun("out", config={"model": "ckpt", "layer": -1}, n_parts=4,
...                      outputs=["result.parquet"], resume=True)          # doctest: +SKIP
>>> run.begin()                                                              # doctest: +SKIP
>>> for p in run.todo():                                                     # doctest: +SKIP
...     run.write_part(p, lambda tmp: table_of(p).to_parquet(tmp))
>>> if run.all_done():                                                       # doctest: +SKIP
...     with run.merging() as mine:
...         if mine:
...             merge(run.part_paths())
...             run.complete(n_rows=1000)
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._errors import StoreError, UsageError
from .store.writer import _config_diff as config_diff  # the tokenizer's resume uses the same rule

RUNNING, COMPLETE = "running", "complete"


def rank_world(*, devices: Sequence[Any] | None = None, rank: int | None = None,
               env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """This process's ``(rank, world)``.

    Parameters
    ----------
    devices
        The ``--devices`` list of a run that starts one worker per device: world = its length, and
        ``rank`` (the worker's position) must be given.
    rank
        The worker's rank when ``devices`` is given.
    env
        Environment to read (default ``os.environ``): torchrun's ``RANK`` and ``WORLD_SIZE``.
    """
    if devices is not None and len(devices) > 0:
        world = len(devices)
        r = 0 if rank is None else int(rank)
    else:
        e = os.environ if env is None else env
        world, r = int(e.get("WORLD_SIZE", "1")), int(e.get("RANK", "0"))
    if world < 1 or not 0 <= r < world:
        msg = f"rank {r} of world size {world}: the rank must lie in [0, world size)"
        raise UsageError(msg)
    return r, world


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp)`` on a hidden per-process temporary name next to ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as JSON at ``path``, atomically."""
    atomic_write(path, lambda t: t.write_text(json.dumps(obj, indent=1, default=str)))


class PartitionedRun:
    """One resumable run over ``n_parts`` parts in ``out``.

    Parameters
    ----------
    out
        Output directory.
    config
        Everything that determines the results (JSON-serialisable); compared on resume.
    n_parts
        Number of parts.
    info_name
        Name of the status file in ``out``.
    parts_dir
        Folder of the part files inside ``out``.
    part_name
        Part index -> file name (default ``part-PPPPPP.parquet``).
    outputs
        Names of the merged outputs in ``out`` (deleted by ``overwrite``; their presence means an
        earlier run left results).
    resume, overwrite
        Keep finished parts of a run with the same config / delete an earlier run's results.
    rank, world
        This process's share of the parts (see :func:`rank_world`).
    command
        Name used in messages (``"scfm embed"``).
    info_extra
        Fields written into every status file beside ``config``/``status`` (e.g. a ``format`` tag).
    """

    def __init__(self, out: str | Path, *, config: Mapping[str, Any], n_parts: int, info_name: str = "run_info.json",
                 parts_dir: str = "parts", part_name: Callable[[int], str] | None = None,
                 outputs: Sequence[str] = (), resume: bool = False, overwrite: bool = False, rank: int = 0,
                 world: int = 1, command: str = "scfm", info_extra: Mapping[str, Any] | None = None) -> None:
        if n_parts < 1:
            msg = f"a run needs at least one part, got {n_parts}"
            raise UsageError(msg)
        self.out = Path(out)
        self.config = json.loads(json.dumps(dict(config), default=str))  # as it will read back from JSON
        self.n_parts, self.rank, self.world = int(n_parts), int(rank), int(world)
        self.info_path = self.out / info_name
        self.parts = self.out / parts_dir
        self._name = part_name or (lambda p: f"part-{p:06d}.parquet")
        self.outputs = [self.out / o for o in outputs]
        self.resume, self.overwrite, self.command = resume, overwrite, command
        self.info_extra = dict(info_extra or {})

    # ---- paths and state ------------------------------------------------------------------------
    def part_path(self, p: int) -> Path:
        return self.parts / self._name(p)

    def part_paths(self) -> list[Path]:
        return [self.part_path(p) for p in range(self.n_parts)]

    def info(self) -> dict[str, Any] | None:
        """The status file's contents (``None`` if absent or unreadable)."""
        try:
            return json.loads(self.info_path.read_text())
        except (OSError, ValueError):
            return None

    def _results(self) -> list[Path]:
        found = list(self.parts.glob("*")) if self.parts.is_dir() else []
        return [p for p in found if not p.name.startswith(".")] + [o for o in self.outputs if o.exists()]

    def done(self, p: int) -> bool:
        return self.part_path(p).exists()

    def all_done(self) -> bool:
        return all(self.done(p) for p in range(self.n_parts))

    def todo(self) -> list[int]:
        """This rank's parts not yet written."""
        return [p for p in range(self.rank, self.n_parts, self.world) if not self.done(p)]

    # ---- lifecycle --------------------------------------------------------------------------------
    def begin(self, *, wait_s: float = 600.0) -> None:
        """Check ``out`` against this run (resume / overwrite rules) and mark it running.

        Raises
        ------
        StoreError
            ``out`` holds results of another config (names the keys that differ), or of an earlier run
            without ``resume``/``overwrite``.
        """
        if self.rank != 0:
            self._wait_for_rank0(wait_s)
            return
        if self.out.exists() and not self.out.is_dir():
            msg = f"{self.out}: is a file; --out must be a directory"
            raise StoreError(msg)
        if self.overwrite:  # the status file first, so an interrupted --overwrite never reads "complete"
            self.info_path.unlink(missing_ok=True)
            for f in self._results():
                f.unlink(missing_ok=True)
        elif self.info_path.exists() or self._results():
            old = (self.info() or {}).get("config")
            results = self._results()
            if results and old != self.config:  # a run that wrote nothing holds nothing to lose
                diff = config_diff(old or {}, self.config) if old is not None else "no readable status file"
                msg = (f"{self.out}: holds results of {self.command} with other settings ({diff}); use another "
                       "--out or --overwrite")
                raise StoreError(msg)
            if results and not self.resume:
                msg = f"{self.out}: holds (part of) an earlier run; pass --resume to continue it or --overwrite"
                raise StoreError(msg)
        if self.world == 1 and self.parts.is_dir():  # temporaries of a killed run (one process: none live)
            for f in self.parts.glob(".*.tmp"):
                f.unlink(missing_ok=True)
        self.parts.mkdir(parents=True, exist_ok=True)
        write_json(self.info_path, {**self.info_extra, "config": self.config, "status": RUNNING,
                                    "n_parts": self.n_parts})

    def _wait_for_rank0(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            info = self.info()
            if info is not None and info.get("config") == self.config and self.parts.is_dir():
                return
            if time.monotonic() > deadline:
                msg = (f"{self.out}: rank {self.rank} waited {wait_s:.0f}s for rank 0 to prepare the run "
                       f"(status file {self.info_path.name} with this run's settings); is rank 0 running?")
                raise StoreError(msg)
            time.sleep(0.5)

    def write_part(self, p: int, write: Callable[[Path], Any],
                   side: Mapping[str, Callable[[Path], Any]] | None = None) -> None:
        """Write part ``p``: each ``side`` file (suffix -> writer, e.g. ``".genes.npz"``) and then the part
        itself, each atomically, so the part's existence means its side files exist too."""
        path = self.part_path(p)
        for suffix, w in (side or {}).items():
            atomic_write(path.with_suffix(suffix), w)
        atomic_write(path, write)

    def missing(self) -> list[str]:
        return [self.part_path(p).name for p in range(self.n_parts) if not self.done(p)]

    @contextlib.contextmanager
    def merging(self) -> Iterator[bool]:
        """Hold the merge lock; yields ``True`` when this process should merge (every part done, no
        other merge running, run not already complete)."""
        import fcntl

        lock = self.parts / ".merge.lock"  # beside the parts: OUT keeps only the results
        with open(lock, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another rank merges
                yield False
                return
            try:
                f.seek(0)
                f.truncate()
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
                f.flush()
                info = self.info() or {}
                yield self.all_done() and not (info.get("status") == COMPLETE
                                               and all(o.exists() for o in self.outputs))
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def wait_all(self, *, timeout_s: float, poll_s: float = 2.0) -> None:
        """Wait until every part exists (other ranks still writing); refuse after ``timeout_s`` naming the
        missing parts."""
        deadline = time.monotonic() + timeout_s
        while not self.all_done():
            if time.monotonic() > deadline:
                msg = (f"{self.out}: parts {self.missing()[:5]} never appeared within {timeout_s:.0f}s; rerun with "
                       "--resume to write them")
                raise StoreError(msg)
            time.sleep(poll_s)

    def check_merge_ready(self) -> None:
        """Refuse to merge while parts are missing (names them)."""
        missing = self.missing()
        if missing:
            msg = f"{self.out}: parts {missing[:5]} are missing; rerun with --resume"
            raise StoreError(msg)

    def complete(self, **summary: Any) -> dict[str, Any]:
        """Mark the run complete (after the merged outputs are in place); returns the status written."""
        info = {**self.info_extra, "config": self.config, "status": COMPLETE, "n_parts": self.n_parts, **summary}
        write_json(self.info_path, info)
        return info
