"""Progress bars: a disabled bar imports no tqdm (start-up of every run); an enabled one is tqdm's."""

from __future__ import annotations

import os
import subprocess
import sys

from scfm_fast._progress import _NoBar, progress

_PROBE = """
import sys
from scfm_fast._progress import progress
with progress(total=10, desc="x", enabled={enabled}) as bar:
    bar.update(3)
    bar.set_postfix(a=1)
print(type(bar).__module__, type(bar).__name__, "tqdm" in sys.modules, bar.n)
"""


def _probe(enabled: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTEST_CURRENT_TEST", "SCFM_FAST_PROGRESS")}
    r = subprocess.run([sys.executable, "-c", _PROBE.format(enabled=enabled)], capture_output=True, text=True,
                       env={**clean, **env}, check=True)
    return r.stdout.split()


def test_disabled_bar_counts_without_importing_tqdm():
    assert _probe("False") == ["scfm_fast._progress", "_NoBar", "False", "3"]
    assert _probe("True", SCFM_FAST_PROGRESS="0") == ["scfm_fast._progress", "_NoBar", "False", "3"]


def test_enabled_bar_is_tqdm_outside_notebooks():
    module, name, imported, n = _probe("True")
    assert (module, name, imported, n) == ("tqdm.std", "tqdm", "True", "3")


def test_under_pytest_bars_are_quiet():
    bar = progress(total=5, desc="t", enabled=True)
    assert isinstance(bar, _NoBar)
    bar.update(2)
    bar.close()
    assert bar.n == 2
