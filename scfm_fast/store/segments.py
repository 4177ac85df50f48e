"""Per-token packed arrays kept as one ``.npy`` segment per shard, read as one flat array.

A run's shard parts already hold each shard's tokens (and GeneCompass values) in the packed dtype, so
``finalize`` hard-links them into ``__scfm__/packed/tokens/`` instead of copying every token into one
file: assembling the store then costs a few metadata operations rather than a serial copy of the whole
corpus (~0.65 GB per 200k cells, ~0.3 TB for 100M). :class:`SegmentedArray` presents the segments as one
read-only 1-D array (slices, integer-array gathers, ``np.asarray``), so readers index global token
positions exactly as in a single ``tokens.npy``.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import StoreError


def segment_file(folder: Path, shard: str) -> Path:
    """The segment of Parquet shard ``shard`` in ``folder`` (``part-....parquet`` -> ``part-....npy``)."""
    return folder / shard.replace(".parquet", ".npy")


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard link ``src`` at ``dst`` (no second copy of the data); a plain copy where the file system
    has no hard links or ``dst`` is on another one."""
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        shutil.copyfile(src, dst)


class SegmentedArray:
    """A read-only 1-D array stored as consecutive 1-D ``.npy`` files, memory-mapped on first use.

    Supports what readers of a flat packed array use: ``len``, ``shape``, ``dtype``, integer and slice
    indexing (a slice inside one segment is a view of its memory map, else a copy), integer-array
    gathers and ``np.asarray``.

    Parameters
    ----------
    files, lengths
        The segments in order and the number of elements each must hold (checked when it is first
        mapped; empty segments may be left out).
    dtype
        The elements' dtype (checked likewise).
    repair
        What the error of a missing or damaged segment tells the user to do.
    """

    ndim = 1

    def __init__(self, files: Sequence[Path], lengths: Sequence[int], dtype: Any, *, repair: str) -> None:
        self.files = [Path(f) for f in files]
        self.dtype = np.dtype(dtype)
        self.starts = np.zeros(len(self.files) + 1, dtype=np.int64)
        np.cumsum(np.asarray(lengths, dtype=np.int64), out=self.starts[1:])
        self.shape = (int(self.starts[-1]),)
        self.size = self.shape[0]
        self._repair = repair
        self._maps: list[np.ndarray | None] = [None] * len(self.files)

    def __len__(self) -> int:
        return self.size

    def segment(self, k: int) -> np.ndarray:
        """Segment ``k``, memory-mapped (checked against its expected dtype and length)."""
        m = self._maps[k]
        if m is None:
            f, n = self.files[k], int(self.starts[k + 1] - self.starts[k])
            try:
                m = np.load(f, mmap_mode="r")
            except (OSError, ValueError) as e:
                msg = f"{f}: packed segment missing or damaged ({e}); {self._repair}"
                raise StoreError(msg) from None
            if m.ndim != 1 or m.dtype != self.dtype or m.shape[0] != n:
                msg = (f"{f}: packed segment holds {m.dtype}{list(m.shape)}, expected {self.dtype}[{n}]; "
                       f"{self._repair}")
                raise StoreError(msg)
            self._maps[k] = m
        return m

    def _range(self, lo: int, hi: int) -> np.ndarray:
        if hi <= lo:
            return np.empty(0, dtype=self.dtype)
        k = int(np.searchsorted(self.starts, lo, side="right")) - 1
        if hi <= self.starts[k + 1]:  # inside one segment (every cell is): a view, no copy
            return self.segment(k)[lo - self.starts[k]:hi - self.starts[k]]
        out, pos = np.empty(hi - lo, dtype=self.dtype), lo
        while pos < hi:
            end = min(hi, int(self.starts[k + 1]))
            out[pos - lo:end - lo] = self.segment(k)[pos - self.starts[k]:end - self.starts[k]]
            pos, k = end, k + 1
        return out

    def _take(self, idx: np.ndarray) -> np.ndarray:
        flat = idx.reshape(-1)
        out = np.empty(flat.shape, dtype=self.dtype)
        seg = np.searchsorted(self.starts, flat, side="right") - 1
        order = np.argsort(seg, kind="stable")  # group the positions by segment: one gather per segment
        sorted_seg = seg[order]
        for part in np.split(order, np.flatnonzero(sorted_seg[1:] != sorted_seg[:-1]) + 1):
            if part.size:
                k = int(seg[part[0]])
                out[part] = self.segment(k)[flat[part] - self.starts[k]]
        return out.reshape(idx.shape)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.size)
            if step != 1:
                return self._take(np.arange(start, stop, step, dtype=np.int64))
            return self._range(start, stop)
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if not -self.size <= i < self.size:
                msg = f"index {i} out of range for {self.size} elements"
                raise IndexError(msg)
            return self._range(i % self.size, i % self.size + 1)[0]
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != self.shape:
                msg = f"boolean index of shape {idx.shape} for {self.size} elements"
                raise IndexError(msg)
            idx = np.flatnonzero(idx)
        if not np.issubdtype(idx.dtype, np.integer):
            msg = f"only integers, slices and integer or boolean arrays index a packed array, not {idx.dtype}"
            raise IndexError(msg)
        idx = idx.astype(np.int64, copy=False)
        if idx.size:
            lo, hi = int(idx.min()), int(idx.max())
            if lo < -self.size or hi >= self.size:
                msg = f"index out of range for {self.size} elements"
                raise IndexError(msg)
            if lo < 0:
                idx = np.where(idx < 0, idx + self.size, idx)
        return self._take(idx)

    def take_ranges(self, starts: np.ndarray, lengths: np.ndarray, dtype: Any = None) -> np.ndarray:
        """Elements ``[starts[i], starts[i] + lengths[i])`` for each ``i``, concatenated (as ``dtype``).

        What a batch of cells needs: one slice per range (a cell never spans segments), instead of a
        gather through an array of every position.
        """
        starts = np.asarray(starts, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        out = np.empty(int(lengths.sum()), dtype=self.dtype if dtype is None else dtype)
        if starts.size and (starts.min() < 0 or lengths.min() < 0 or (starts + lengths).max() > self.size):
            msg = f"range out of bounds for {self.size} elements"
            raise IndexError(msg)
        seg = np.searchsorted(self.starts, starts, side="right") - 1
        pos = 0
        for s, n, k in zip(starts.tolist(), lengths.tolist(), seg.tolist()):
            if n:
                base = int(self.starts[k])
                if s + n <= self.starts[k + 1]:
                    out[pos:pos + n] = self.segment(k)[s - base:s - base + n]
                else:  # spans segments (not in a store of shards): copied piece by piece
                    out[pos:pos + n] = self._range(s, s + n)
                pos += n
        return out

    def __array__(self, dtype: Any = None, *, copy: bool | None = None) -> np.ndarray:
        a = self._range(0, self.size)
        return a if dtype is None else a.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"SegmentedArray({self.size} x {self.dtype}, {len(self.files)} segments)"


def open_segments(packed: Path, name: str, shards: Sequence[dict[str, Any]], dtype: Any, *,
                  repair: str) -> SegmentedArray:
    """The per-token array ``name`` of a segmented packed store: one segment per shard record with
    tokens, in (file, row) order.  Every segment file must be present (one directory listing); each is
    checked against its record when first mapped."""
    folder = packed / name
    recs = sorted((s for s in shards if int(s["n_tokens"]) > 0), key=lambda s: (s["file_index"], s["start"]))
    files = [segment_file(folder, s["file"]) for s in recs]
    try:
        present = {e.name for e in os.scandir(folder)}
    except OSError as e:
        msg = f"{folder}: packed {name} missing ({e}); {repair}"
        raise StoreError(msg) from None
    gone = [f.name for f in files if f.name not in present]
    if gone:
        msg = f"{folder}: {len(gone)} packed segment(s) missing ({', '.join(gone[:3])}); {repair}"
        raise StoreError(msg)
    return SegmentedArray(files, [int(s["n_tokens"]) for s in recs], dtype, repair=repair)
