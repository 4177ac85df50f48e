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


class _NoBar:
    """What a disabled bar is asked for, without importing tqdm (~35-50 ms at start-up of every run)."""

    def __init__(self, total: int | None = None) -> None:
        self.total, self.n = total, 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress(*, total: int | None, desc: str, unit: str = "cells", enabled: bool | None = True) -> Any:
    """A tqdm bar: ``tqdm.auto``'s in a notebook, the terminal one otherwise (``tqdm.auto`` also imports
    asyncio: +15 ms); a stand-in that draws nothing when disabled."""
    if not progress_enabled(requested=enabled):
        return _NoBar(total)
    if "IPython" in sys.modules:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, smoothing=0.1)
