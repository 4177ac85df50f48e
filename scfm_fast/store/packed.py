"""Per-shard files of a token run and the packed token store they are assembled into.

:class:`ShardFiles` writes one shard's Parquet file (what users read) and its packed part (tokens in
the packed dtype, offsets, cell/file index, optional GeneCompass arrays) from the same in-memory
table; :func:`cell_appenders` streams the per-cell arrays into the packed store's ``.npy`` files (the
per-token ones are linked as segments, :mod:`.segments`).  Used by the
run's :class:`~scfm_fast.store.writer.ShardedTokenWriter` and by :mod:`~scfm_fast.store.merge`.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .. import _arrow as arrow
from .._errors import StoreError
from ._atomic import _tmp_name
from ._direct import ShardSink
from ._parquet_lists import write_table
from .schema import PARTS_DIR

#: copy_file_range errors that mean "not here" (other file systems, old kernels): fall back to read/write
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.EPERM}


def part_dir(parts: Path, shard: str) -> Path:
    """The packed part of Parquet shard ``shard`` (a directory of ``.npy`` arrays) under ``parts``."""
    return parts / shard.replace(".parquet", ".part")


def npy_extent(path: Path) -> tuple[np.dtype, int, int]:
    """``(dtype, length, data offset)`` of a 1-D ``.npy`` file, from its header alone."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        if len(shape) != 1 or dtype.hasobject:
            msg = f"{path}: not a 1-D numeric array (shape {shape}); rerun with --overwrite"
            raise StoreError(msg)
        return dtype, int(shape[0]), f.tell()


class _NpyAppender:
    """Write a 1-D ``.npy`` of known length by appending blocks (bounded memory, no memory map)."""

    def __init__(self, path: Path, dtype: Any, n: int) -> None:
        self.dtype, self.n, self.written = np.dtype(dtype), n, 0
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        np.lib.format.write_array_header_2_0(
            self.f, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (n,)})

    def write(self, block: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())
        self.written += block.size

    def copy_from(self, path: Path) -> int:
        """Append the data of 1-D ``.npy`` file ``path`` (same dtype) without reading it into Python:
        ``os.copy_file_range`` copies inside the kernel (a plain read/write loop where unsupported).
        Returns the number of elements appended."""
        dtype, n, start = npy_extent(path)
        if dtype != self.dtype:
            msg = f"{path}: holds {dtype}, expected {self.dtype}; rerun with --overwrite"
            raise StoreError(msg)
        left = n * dtype.itemsize
        self.f.flush()
        dst = self.f.tell()
        with open(path, "rb") as src:
            pos = start
            try:
                # explicit offsets on both sides: neither descriptor's position moves under Python
                while left > 0:
                    done = os.copy_file_range(src.fileno(), self.f.fileno(), left, pos, dst)
                    if done == 0:
                        break
                    pos, dst, left = pos + done, dst + done, left - done
            except (AttributeError, OSError) as e:
                if isinstance(e, OSError) and e.errno not in _NO_COPY_RANGE:
                    raise
                src.seek(pos)
                self.f.seek(dst)
                while left > 0 and (buf := src.read(min(left, 1 << 24))):
                    self.f.write(buf)  # buffered: written in full
                    left -= len(buf)
                dst = self.f.tell()
            self.f.seek(dst)
        if left:
            msg = f"{path}: shorter than its header says; rerun with --overwrite"
            raise StoreError(msg)
        self.written += n
        return n

    def close(self, *, check: bool = True) -> None:
        self.f.close()
        if check and self.written != self.n:
            msg = f"{self.f.name}: wrote {self.written} of {self.n} elements"
            raise StoreError(msg)


#: optional packed arrays, written when the shards carry the column: name -> (per "token"/"cell", dtype)
OPTIONAL_PACKED = {"values": ("token", np.float32), "species": ("cell", np.int8)}


def _flat_values(col: pa.ChunkedArray) -> list[np.ndarray]:
    """The values of a list column, chunk by chunk (views where Arrow allows): a table of several tokenized
    pieces is not combined into one copy first."""
    out = []
    for ch in col.chunks:
        offsets = arrow.to_numpy(ch.offsets)
        lo, hi = int(offsets[0]), int(offsets[-1])
        out.append(arrow.to_numpy(ch.values.slice(lo, hi - lo)))
    return out


def _list_offsets(col: pa.ChunkedArray) -> np.ndarray:
    """The list column's offsets over all chunks, from 0 (int64)."""
    parts, base = [np.zeros(1, np.int64)], 0
    for ch in col.chunks:
        o = arrow.to_numpy(ch.offsets).astype(np.int64)
        parts.append(o[1:] - o[0] + base)
        base = int(parts[-1][-1]) if len(o) > 1 else base
    return np.concatenate(parts)


def _optional_columns(table: pa.Table) -> dict[str, list[np.ndarray]]:
    """The shard's optional packed arrays (GeneCompass values, species), flattened like the tokens."""
    out = {}
    for name, (per, dtype) in OPTIONAL_PACKED.items():
        if name in table.column_names:
            col = table.column(name)
            parts = _flat_values(col) if per == "token" else [arrow.to_numpy(c) for c in col.chunks]
            out[name] = [np.asarray(a, dtype=dtype) for a in parts]
    return out


def _save_parts(path: Path, parts: list[np.ndarray], dtype: np.dtype) -> None:
    """One 1-D ``.npy`` file of ``parts`` concatenated (converted to ``dtype`` one part at a time)."""
    dtype = np.dtype(dtype)
    with ShardSink(path) as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                "shape": (sum(int(a.size) for a in parts),)})
        for a in parts:
            f.write_converted(a, dtype)


def packed_split(optional: Sequence[str]) -> tuple[list[str], list[str]]:
    """The packed arrays of a store carrying ``optional``: (per-token ones, stored as segments, tokens
    first; per-cell optional ones, appended)."""
    per_token = ["tokens", *(n for n in optional if OPTIONAL_PACKED[n][0] == "token")]
    return per_token, [n for n in optional if OPTIONAL_PACKED[n][0] == "cell"]


def cell_appenders(d: Path, *, n_cells: int, optional: Sequence[str] = ()) -> dict[str, _NpyAppender]:
    """One appender per per-cell packed array (offsets, cell_index, file_index and ``optional`` per-cell
    ones such as species); the per-token arrays are segments (:mod:`.segments`)."""
    sizes = [("offsets", np.int64, n_cells + 1), ("cell_index", np.int64, n_cells), ("file_index", np.int32, n_cells)]
    for name in optional:
        per, dt = OPTIONAL_PACKED[name]
        if per != "cell":
            msg = f"{name} is a per-token array: it is stored as segments, not appended"
            raise ValueError(msg)
        sizes.append((name, dt, n_cells))
    return {name: _NpyAppender(d / f"{name}.npy", dt, n) for name, dt, n in sizes}


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """How shards are encoded, chosen by measurement (README, "Tokenizer"): plain pages, no compression,
    no dictionary, statistics only on the scalar columns.  Token lists are ~80% of a shard's bytes;
    dictionary-encoding them (the cost is the hash lookup per token) with lz4 made files 2.3x smaller
    but doubled the write CPU, and compressing plain int32 tokens saves little (lz4 -15%) for +70% CPU.
    Min/max statistics of token lists serve no reader. With these options the list columns are written by
    :mod:`._parquet_lists` (plain pages, levels per cell), the others by pyarrow."""
    scalar = [f.name for f in schema if not pa.types.is_list(f.type) and not pa.types.is_large_list(f.type)]
    return {"compression": "none", "use_dictionary": False, "write_statistics": scalar,
            "row_group_size": 8192}


@dataclass(frozen=True)
class ShardFiles:
    """Writes one shard's files (Parquet + packed part), each atomically; picklable, so that worker
    processes write their own shards while only the run's :class:`ShardedTokenWriter` records them."""

    out: Path
    dtype: np.dtype

    def write(self, table: pa.Table, name: str) -> None:
        """The Parquet shard ``name`` and its packed part; a file not recorded in the manifest is a
        stray that a resumed run deletes."""
        self.write_part(table, name)
        tmp = self.out / _tmp_name(name)
        try:
            with ShardSink(tmp) as sink:  # past the page cache where allowed (see _direct)
                write_table(table, sink, **parquet_options(table.schema))  # token lists written directly
            os.replace(tmp, self.out / name)
        except BaseException:
            tmp.unlink(missing_ok=True)  # e.g. a full disk: leave no partial file behind
            raise

    def written(self, name: str) -> bool:
        """Whether shard ``name`` and its packed part are on disk (each is renamed into place once complete)."""
        return (self.out / name).is_file() and part_dir(self.out / PARTS_DIR, name).is_dir()

    def write_part(self, table: pa.Table, name: str) -> None:
        """The shard's packed part: a directory of plain ``.npy`` arrays (tokens in the packed dtype,
        offsets, cell/file index, optional arrays), renamed into place once complete."""
        ids = table.column("input_ids")
        arrays = {"tokens": (_flat_values(ids), self.dtype), "offsets": ([_list_offsets(ids)], np.int64),
                  "cell_index": ([arrow.to_numpy(table.column("cell_index"))], np.int64),
                  "file_index": ([arrow.to_numpy(table.column("file_index"))], np.int32),
                  **{k: (v, OPTIONAL_PACKED[k][1]) for k, v in _optional_columns(table).items()}}
        final = part_dir(self.out / PARTS_DIR, name)
        tmp = final.with_name(_tmp_name(final.name))
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for key, (parts, dtype) in arrays.items():
                _save_parts(tmp / f"{key}.npy", parts, dtype)  # raw bytes after a header; tokens linked by finalize
            shutil.rmtree(final, ignore_errors=True)  # a stray of a crashed run (never recorded)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
