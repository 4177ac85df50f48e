"""Loads the compiled core (``scfm_fast._core``) and decides how many threads the fast paths use.

``core`` is the extension module, or ``None`` with the reason in ``core_error``.  Nothing here
raises on import: callers pick a fallback (Numba, then NumPy) or, when the user demanded the C++
backend, call :func:`require_core` for an error that says how to rebuild.

Thread policy (shared by the C++ core and the Numba kernels): ``n_threads=None`` means every core
this process may use, except in a PyTorch ``DataLoader`` worker or any process created by
``fork()``, where it means 1.  Forked children inherit no threads, and N workers each spinning up
all cores would oversubscribe the machine.
"""

from __future__ import annotations

import os
import sys
import warnings
from types import ModuleType

from ._errors import BackendUnavailableError

_REBUILD_HINT = (
    "rebuild with `pip install -e .` (or `python setup.py build_ext --inplace`) from the source tree; "
    "installs made with SCFM_FAST_NO_EXT=1 have no C++ core"
)

core: ModuleType | None
core_error: str | None
try:
    from . import _core as core  # type: ignore[attr-defined, no-redef]

    core_error = None
except ImportError as exc:  # not built, built for another Python, or missing symbols
    core = None
    core_error = f"{type(exc).__name__}: {exc}"

_warned_fallback = False
_in_forked_child = False


def _mark_forked_child() -> None:
    global _in_forked_child
    _in_forked_child = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_mark_forked_child)


def require_core() -> ModuleType:
    """Return the compiled core, or raise :class:`BackendUnavailableError` saying why and how to fix it."""
    if core is None:
        msg = f"the C++ core (scfm_fast._core) could not be imported ({core_error}); {_REBUILD_HINT}"
        raise BackendUnavailableError(msg)
    return core


def warn_fallback_once(to: str) -> None:
    """Warn (once per process) that the C++ core is missing and ``to`` is used instead."""
    global _warned_fallback
    if _warned_fallback:
        return
    _warned_fallback = True
    warnings.warn(
        f"scfm_fast's C++ core is unavailable ({core_error}); using the {to} backend instead, which is "
        f"slower. To get the fast path, {_REBUILD_HINT}.",
        RuntimeWarning,
        stacklevel=4,  # warn_fallback_once <- _pick_backend <- tokenize_rank <- caller
    )


def available_cpus() -> int:
    """Cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def in_worker_process() -> bool:
    """True inside a PyTorch DataLoader worker or a ``fork()``-ed child of this process."""
    if _in_forked_child:
        return True
    torch = sys.modules.get("torch")  # never import torch just to ask
    if torch is not None:
        try:
            return torch.utils.data.get_worker_info() is not None
        except AttributeError:  # pragma: no cover - torch partially imported
            return False
    return False


def resolve_n_threads(n_threads: int | None) -> int:
    """The thread count to use: ``n_threads`` if given (must be >= 1), else the default policy."""
    if n_threads is None:
        return 1 if in_worker_process() else available_cpus()
    if isinstance(n_threads, bool) or int(n_threads) != n_threads or n_threads < 1:
        msg = f"n_threads must be a positive integer or None, got {n_threads!r}"
        raise ValueError(msg)
    return int(n_threads)
