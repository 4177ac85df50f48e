"""Atomic file writes shared by the token store's writers: temporary names unique to a process,
replaced into place only once complete."""

from __future__ import annotations

import os
from pathlib import Path


def _tmp_name(name: str) -> str:
    """A hidden temporary name unique to this process (a stray one from another run is never reused)."""
    return f".{name}.{os.getpid()}.tmp"


def _atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (written to a temporary name and fsynced first)."""
    tmp = path.with_name(_tmp_name(path.name))
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: the previous manifest stays, no partial file
        raise
