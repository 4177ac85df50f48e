"""The chunk loop of ``scfm tokenize``: in this process (three overlapping threads) or in worker processes.

In this process (inputs under 40,000 cells, or ``--workers 1``) each chunk is read and ranked in pieces (:mod:`._pieces`) on a reading
thread and the calling thread, and its shard written on a writing thread while the next chunk is ranked.

Worker processes (the default for larger inputs: one per core) each read, rank and write whole chunks (their Parquet shard and packed part, under
the shard's final name), so reading, decoding, ranking and Parquet encoding of different chunks run
on all cores without sharing a GIL; a worker writes each shard on a thread of its own while it reads
and ranks its next chunk. The parent only records finished shards in the manifest, in input order. A
shard file that a worker wrote but the parent never recorded (a crash) is a stray that a resumed run
deletes, so resume, the lock and the finalisation checks are those of the in-process loop.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import copy
import functools
import multiprocessing as mp
import multiprocessing.util
import os
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import ScfmError
from ..store.schema import shard_name
from ._pieces import chunk_pieces, piece_size, tokenize_pieces

#: Below this many cells to tokenize the in-process loop is used: forking workers and loading the
#: core in each costs more than it saves on a small input.
MIN_WORKER_CELLS = 40_000
#: workers when ``--workers`` is left out: each holds ~0.5 GiB at the default chunk size
MAX_DEFAULT_WORKERS = 8
#: input files a worker keeps open (its most recently used): chunks are handed out in file order, so an
#: older file is rarely needed again, and a corpus of thousands of files would exhaust ``ulimit -n``
MAX_OPEN_PER_WORKER = 4


@dataclass
class FilePlan:
    """One input file of the run: where its cells go and what its chunks need (the file itself is opened
    only while its chunks are read: a corpus of thousands of files must not hold thousands of handles)."""

    file_index: int
    path: str
    n_obs: int
    col_token: np.ndarray
    var_names: Any
    read_cols: list[str]
    qc_keep: np.ndarray | None


def n_workers(n_threads: int | None) -> int:
    """Worker processes for ``--workers``; left out, one per usable core (at most
    :data:`MAX_DEFAULT_WORKERS`). On the 2-core benchmark machines 2 workers ran 5-43% faster than one
    process with the core on both cores (Zarr v2/v3, h5ad at 200,000 cells), for ~2-2.5x the resident
    memory (parent ~150 MiB + ~415-500 MiB per worker, against ~400 MiB in one process); inputs under
    :data:`MIN_WORKER_CELLS` always run in one process. ``--workers 1`` forces one process."""
    if n_threads:
        return n_threads
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_WORKERS))


def pending_chunks(plans: Sequence[FilePlan], writer, chunk_size: int) -> tuple[list[tuple[int, int]], int]:
    """The (file index, start) of every chunk not yet written, and the number of cells already done.

    Shards start at multiples of ``chunk_size`` (recorded in the config, so a resumed run cuts alike).
    """
    todo, done = [], 0
    for p in plans:
        for s in range(0, p.n_obs, chunk_size):
            if writer.done(p.file_index, s) is None:
                todo.append((p.file_index, s))
            else:
                done += min(chunk_size, p.n_obs - s)
    return todo, done


def use_workers(workers: int, todo: Sequence[tuple[int, int]], chunk_size: int) -> bool:
    return (workers > 1 and len(todo) > 1 and len(todo) * chunk_size >= MIN_WORKER_CELLS
            and "fork" in mp.get_all_start_methods())


@functools.cache
def _libc() -> Any:
    """glibc (``malloc_trim``, ``mallopt``), or ``None`` (another C library)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim, libc.mallopt  # noqa: B018 - both must exist
        return libc
    except (OSError, AttributeError):
        return None


def _write_and_trim(write, table, **kw) -> None:
    """Write a shard, then hand the heap memory freed since back to the OS (the in-process loop).

    glibc raises its mmap threshold adaptively (up to 32 MiB) and keeps freed blocks below it in its
    per-thread arenas, so without a trim resident memory crept up with the number of chunks. A trim
    per shard costs ~1 ms, but every buffer is then faulted in and zero-filled afresh by the kernel;
    worker processes keep a steady heap instead (:func:`_steady_heap`).
    """
    write(table, **kw)
    del table
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


#: mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _steady_heap() -> None:
    """In a worker process: serve buffers of up to 256 MiB from the heap and never shrink it, so that each
    chunk reuses the memory the last one freed. Each chunk allocates the same sizes, so the heap settles
    after the first chunks; trimming after each shard instead (and glibc's default of a fresh ``mmap`` for
    anything >= 32 MiB) had the kernel zero-fill every buffer again: on the 200,000-cell Zarr benchmark
    that was ~30-40% of the workers' system CPU, for ~3% lower peak RSS per worker."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 256 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
        import pyarrow as pa

        # Arrow's own allocator (mimalloc) returns freed pages to the OS within milliseconds: Parquet
        # pages were faulted in afresh for every shard (~2-3% of the run's CPU)
        pa.set_memory_pool(pa.system_memory_pool())


def _tokenize_piece(spec, p: FilePlan, obs_columns: list[str], piece) -> tuple[Any, dict[str, Any]]:
    from .pipeline import tokenize_chunk

    qc = None if p.qc_keep is None else p.qc_keep[piece.start:piece.stop]
    return tokenize_chunk(spec, piece, p.col_token, path=p.path, var_names=p.var_names, file_index=p.file_index,
                          obs_columns=obs_columns, qc_keep=qc)


def _read_ahead(p: FilePlan, reader, first: int, chunk_size: int, pool: cf.ThreadPoolExecutor) -> Iterator[Any]:
    """The pieces of ``p`` from row ``first`` on, each next one read on ``pool`` while this one is used."""
    it = reader.iter_chunks(start=first, chunk_size=piece_size(chunk_size), obs_columns=p.read_cols)
    fut = pool.submit(next, it, None)
    while (piece := fut.result()) is not None:
        fut = pool.submit(next, it, None)
        yield piece


def run_in_process(plans: Sequence[FilePlan], writer, *, spec, chunk_size: int, obs_columns: list[str],
                   reader_kw: dict[str, Any], bar) -> None:
    """Read -> tokenize -> write on three threads of this process (the heavy parts release the GIL).

    Chunks are read and ranked in pieces (:mod:`._pieces`), so that ranking starts after the first
    piece is read and a chunk's shard is written while the next chunk is ranked.
    """
    from ..readers import open_reader

    with cf.ThreadPoolExecutor(1) as read_pool, cf.ThreadPoolExecutor(1) as write_pool:
        pending: cf.Future | None = None
        for p in plans:
            # skip the finished prefix without reading it (shards finish in order)
            first = 0
            while first < p.n_obs and (rec := writer.done(p.file_index, first)) is not None:
                first = rec["stop"]
            if first >= p.n_obs:
                continue
            with open_reader(p.path, **reader_kw, max_block_rows=piece_size(chunk_size)) as reader:
                pieces = chunk_pieces(_read_ahead(p, reader, first, chunk_size, read_pool), chunk_size=chunk_size,
                                      n_obs=p.n_obs)
                todo = ((c, last) for c, last in pieces
                        if writer.done(p.file_index, c.start - c.start % chunk_size) is None)
                tokenize = functools.partial(_tokenize_piece, spec, p, obs_columns)
                for start, stop, table, stats in tokenize_pieces(todo, tokenize):
                    if pending is not None:
                        pending.result()  # keep one shard in flight; surfaces write errors
                    pending = write_pool.submit(_write_and_trim, writer.write_shard, table,
                                                file_index=p.file_index, start=start, stop=stop, stats=stats)
                    pending.add_done_callback(lambda _f, n=stop - start: bar.update(n))
                    del table  # the writer holds it; released as soon as it is written
        if pending is not None:
            pending.result()


def _one_chunk(pieces: Iterator[tuple[Any, bool]]) -> Iterator[tuple[Any, bool]]:
    for c, last in pieces:
        yield c, last
        if last:
            return


_JOB: dict[str, Any] = {}


def _init(job: dict[str, Any]) -> None:
    import gc

    from .._buffers import READS

    _JOB.clear()
    # one thread writes this worker's latest shard while its next chunk is read and ranked
    _JOB.update(job, readers={}, pending=None,
                write_pool=cf.ThreadPoolExecutor(1, thread_name_prefix="scfm-shard-write"))
    # the last shard is finished when the pool shuts the worker down, before Python's own exit handlers
    # (those stop the thread pools the write still needs)
    mp.util.Finalize(None, _last_write, exitpriority=100)
    READS.clear()  # the parent's arrays: writing them here would copy every page (copy-on-write)
    _steady_heap()
    blosc = sys.modules.get("numcodecs.blosc")
    if blosc is not None:
        # Blosc's own decoding threads: the workers already fill the cores (~5% less CPU on Zarr v2 without)
        blosc.use_threads = False
    gc.freeze()  # the parent's objects live as long as the worker: the collector need not scan them again


def _open_for_chunk(file_index: int, path: str) -> Any:
    """This worker's reader of input ``file_index``: kept open for its next chunks, at most
    :data:`MAX_OPEN_PER_WORKER` of them (the least recently used closed first)."""
    from ..readers import open_reader

    readers: dict[int, Any] = _JOB["readers"]
    r = readers.pop(file_index, None)
    if r is None:
        while len(readers) >= MAX_OPEN_PER_WORKER:
            readers.pop(next(iter(readers))).close()
        # storage reads capped at one chunk: a worker's next chunk is usually not the following one
        r = open_reader(path, **_JOB["reader_kw"], max_block_rows=_JOB["chunk_size"])
    readers[file_index] = r  # (re)inserted last: the most recently used
    return r


def _write_shard(name: str, table: Any) -> str:
    """In a worker's writing thread: shard ``name``'s files.  An error is printed here too: the last
    shard's is otherwise only seen as a missing file (see :func:`run_workers`)."""
    try:
        _JOB["files"].write(table, name=name)
    except BaseException as e:
        print(f"scfm tokenize: worker {os.getpid()}: writing {name} failed: {e}", file=sys.stderr)
        raise
    return name


def _last_write() -> None:
    with contextlib.suppress(BaseException):  # printed by _write_shard; the parent sees the missing file
        _settle()


def _settle() -> list[str]:
    """Wait for this worker's shard write in flight, if any (re-raising its error): ``[its name]``, or ``[]``."""
    pending, _JOB["pending"] = _JOB["pending"], None
    return [] if pending is None else [pending.result()]


def _work(file_index: int, start: int) -> tuple[str, dict[str, Any], list[str]]:
    """In a worker: read and tokenize one chunk and start writing its shard; returns the shard's manifest
    record and the names of the shards this worker has finished writing since its last result.

    The write overlaps the worker's next chunk (on the 2-core benchmark VM a worker waited ~9% of its
    time for its shard's last blocks to reach the disk); at most one write is in flight per worker."""
    p: FilePlan = _JOB["plans"][file_index]
    r = _open_for_chunk(file_index, p.path)
    size = _JOB["chunk_size"]
    piece = piece_size(size, whole=getattr(r, "decodes_chunks", False))
    pieces = chunk_pieces(r.iter_chunks(start=start, chunk_size=piece, obs_columns=p.read_cols), chunk_size=size,
                          n_obs=r.n_obs)
    tokenize = functools.partial(_tokenize_piece, _JOB["spec"], p, _JOB["obs_columns"])
    first, stop, table, stats = next(tokenize_pieces(_one_chunk(pieces), tokenize))
    name = shard_name(file_index, first)
    n_written = table.num_rows
    written = _settle()
    _JOB["pending"] = _JOB["write_pool"].submit(_write_shard, name, table)
    return name, {"file_index": file_index, "start": first, "stop": stop, "n_cells_written": n_written,
                  "stats": stats}, written


def run_workers(plans: Sequence[FilePlan], writer, todo: Sequence[tuple[int, int]], *, spec, workers: int,
                chunk_size: int, obs_columns: list[str], reader_kw: dict[str, Any], bar) -> None:
    """Tokenize the chunks ``todo`` in ``workers`` forked processes, recording shards in input order.

    The parent holds no input open here: a forked child must not share open HDF5 handles.  A shard is
    recorded once written: its worker says so with a later result, and each worker's last shard is
    written when the pool has shut down (its files are then there, complete, or not at all).
    """
    one = copy.copy(spec)
    one.n_threads = 1  # the workers are the parallelism; each core call stays on one thread
    job = {"plans": {p.file_index: p for p in plans}, "spec": one, "files": writer.files,
           "chunk_size": chunk_size, "obs_columns": obs_columns, "reader_kw": reader_kw}
    tasks = iter(todo)
    queue: deque[cf.Future] = deque()
    waiting: deque[tuple[str, dict[str, Any]]] = deque()  # results in input order, not yet recorded
    written: set[str] = set()  # shards their workers finished writing, not yet recorded

    def arrived(result: tuple[str, dict[str, Any], list[str]]) -> None:
        name, rec, done = result
        written.update(done)
        waiting.append((name, rec))
        while waiting and waiting[0][0] in written:
            name, rec = waiting.popleft()
            written.discard(name)
            writer.record(name, **rec)

    finished = False
    try:
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init,
                                    initargs=(job,)) as pool:

            def submit() -> None:
                t = next(tasks, None)
                if t is not None:
                    queue.append(pool.submit(_work, *t))

            for _ in range(2 * workers):  # two chunks per worker in flight: none waits for the parent
                submit()
            try:
                while queue:
                    result = queue.popleft().result()
                    arrived(result)
                    bar.update(result[1]["stop"] - result[1]["start"])
                    submit()
            except cf.process.BrokenProcessPool:
                msg = ("a tokenize worker process died (killed, e.g. out of memory); rerun the same command "
                       "with --resume to continue, with fewer --workers or a smaller --chunk-size")
                raise ScfmError(msg) from None
            finally:
                # take in the chunks other workers finished, so that a failed run leaves no unrecorded file
                for f in queue:
                    f.cancel()
                for f in queue:
                    if not f.cancelled() and f.exception() is None:
                        arrived(f.result())
        finished = True
    finally:
        # The pool has shut down: every worker finished its last write (or died): the files say which.
        # A shard's files are renamed into place only once complete.
        # Every written one is recorded before a missing one is reported (a failed run leaves no
        # unrecorded file).
        missing = []
        for name, rec in waiting:
            if name in written or writer.files.written(name):
                writer.record(name, **rec)
            else:
                missing.append(name)
        if missing and finished:
            msg = (f"{', '.join(missing)}: not written by their worker (see the worker's error above); rerun "
                   "the same command with --resume to continue")
            raise ScfmError(msg)
