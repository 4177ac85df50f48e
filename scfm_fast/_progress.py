"""Progress bars: tqdm, quiet under pytest or when SCFM_FAST_PROGRESS=0."""

from __future__ import annotations

import os
import sys
from typing import Any


def progress_enabled(*, requested: bool | None = True) -> bool:
    if requested is False:
        return False
    if os.environ.get("SCFM_FAST_PROGRESS", "1") == "0" or "PYTEST_CURRENT_TEST" in os.environ:
        return False
    return True if requested else sys.stderr.isatty()


def progress(*, total: int | None, desc: str, unit: str = "cells", enabled: bool | None = True) -> Any:
    """A ``tqdm.auto`` bar (imported here, not at start-up: tqdm's import takes ~0.1 s)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True,
                disable=not progress_enabled(requested=enabled), smoothing=0.1)
