"""Checks shared by tests that compare two finished token dataset directories."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from scfm_fast.store import TokenStore


def assert_same_shards_and_packed(a: Path, b: Path) -> None:
    """The same Parquet shards (names and tables) and the same packed arrays, optional ones included."""
    names = sorted(p.name for p in a.glob("*.parquet"))
    assert names and names == sorted(p.name for p in b.glob("*.parquet"))
    for n in names:
        assert pq.read_table(a / n).equals(pq.read_table(b / n)), n
    sa, sb = TokenStore(a), TokenStore(b)
    for arr in ("tokens", "offsets", "cell_index", "file_index", "values", "species"):
        x, y = getattr(sa, arr), getattr(sb, arr)
        assert (x is None) == (y is None) and (x is None or np.array_equal(np.asarray(x), np.asarray(y))), arr
