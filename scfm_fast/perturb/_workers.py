"""``scfm perturb``'s ranks: torchrun's environment, and one worker process per ``--devices`` entry."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from .._errors import StoreError


def _die_with_parent() -> None:
    """Make this worker exit when the parent dies (a killed parent must not leave workers writing shards)."""
    parent = os.getppid()
    try:  # Linux: the kernel sends SIGTERM when the parent thread exits
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        if libc.prctl(1, signal.SIGTERM, 0, 0, 0) == 0:  # PR_SET_PDEATHSIG = 1
            if os.getppid() != parent:  # the parent died before the call
                os._exit(1)
            return
    except (OSError, AttributeError):
        pass
    import threading

    def watch() -> None:  # elsewhere: poll for re-parenting
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _worker_entry(opts: dict, rank: int, world: int) -> None:
    from .._errors import ScfmError

    _die_with_parent()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from ._screen_run import work

    try:
        sys.exit(work(argparse.Namespace(**opts), merge=False, prepared=True))
    except ScfmError as e:  # the same one-line report as the main process, not a traceback
        sys.stderr.write(f"scfm perturb (worker {rank}, {opts['devices'][rank]}): error: {e}\n")
        sys.exit(2)


def _spawn_workers(args: argparse.Namespace) -> int:
    """One worker process per ``--devices`` entry (ranks 0..n-1); this parent prepares OUT as rank 0 and merges."""
    import multiprocessing as mp

    from ._output import _columns
    from ._screen_run import _check_options, _job, _layout, finish

    _check_options(args)
    n = len(args.devices)
    cells, out, _, cfg, n_shards = _layout(args)
    job = _job(args, out, cfg, n_shards, 0, n)
    job.begin()
    ctx = mp.get_context("spawn")
    opts = {k: v for k, v in vars(args).items() if k != "func"}
    procs = [ctx.Process(target=_worker_entry, args=(opts, r, n)) for r in range(n)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join()
    bad = [r for r, pr in enumerate(procs) if pr.exitcode != 0]
    if bad:
        msg = f"perturbation workers {bad} failed (see above); rerun with --resume to finish the missing shards"
        raise StoreError(msg)
    # the parent merges once every worker is done: a rank-0 worker waiting for the shards of a failed
    # rank would otherwise wait --merge-timeout (a week) before anyone could report the failure
    finish(job, args, _columns(args, file_index="file_index" in cells.column_names), cfg)
    return 0
