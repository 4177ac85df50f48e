"""Direct chunk reads of 1-D Zarr arrays in a local directory store (``indptr``/``indices``/``data``).

zarr-python 3 routes every read through its asyncio event loop and codec pipeline; for the large
contiguous 1-D reads of a CSR matrix that costs more CPU than the decompression itself. Here the chunk
files are read and decoded with numcodecs directly (blosc, zstd, gzip, or none), straight into the
output array. Only layouts known exactly are taken: v2 without filters; v3 ``bytes`` (little-endian) +
at most one of those compressors, either as the array's codecs or inside ``sharding_indexed`` (shard
files hold many chunks and an index of their byte ranges; the index and its CRC32C are read and checked
here). Anything else returns ``None`` and is read through zarr.

A missing chunk file, or a chunk a shard's index marks as absent, is an error naming the file and chunk;
zarr would return fill values (zeros), silently dropping counts.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._buffers import READS
from .._errors import InputFileError
from ._kept_chunks import kept_chunk
from .base import plain_slice


def _little_endian_bytes(codec: Any) -> bool:
    """``codec`` is v3's ``bytes`` codec storing little-endian (or single-byte) values, as this reader assumes."""
    from zarr.codecs import BytesCodec

    endian = getattr(getattr(codec, "endian", None), "value", None)
    return isinstance(codec, BytesCodec) and endian in (None, "little")


def _v3_codec(codecs: tuple[Any, ...]) -> Any | None | bool:
    """numcodecs decoder for a v3 codec chain; ``None`` for uncompressed; ``False`` if unsupported.

    A big-endian ``bytes`` codec is unsupported: its values would be read byte-swapped."""
    import numcodecs
    from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

    if not codecs or not _little_endian_bytes(codecs[0]) or len(codecs) > 2:
        return False
    if len(codecs) == 1:
        return None
    c = codecs[1]
    if isinstance(c, ZstdCodec):
        return numcodecs.Zstd()
    if isinstance(c, BloscCodec):
        return numcodecs.Blosc()
    if isinstance(c, GzipCodec):
        return numcodecs.GZip()
    return False


@dataclass(frozen=True)
class _Layout:
    """How a 1-D array's chunks are stored: where, how encoded, and (sharded) how indexed."""

    root: str             # the array's directory
    codec: Any            # numcodecs decoder of one chunk; None: stored as raw bytes
    clen: int             # elements per chunk
    per_shard: int = 0    # chunks per shard file; 0: one file per chunk
    index_at_end: bool = True
    index_crc: bool = False

    def index_nbytes(self) -> int:
        return 16 * self.per_shard + (4 if self.index_crc else 0)


def _sharded_layout(root: str, node: Any, sharding: Any) -> _Layout | None:
    """The layout of a ``sharding_indexed`` array whose chunks and index this reader decodes, else None."""
    from zarr.codecs import Crc32cCodec

    codec = _v3_codec(tuple(sharding.codecs))
    index_codecs = tuple(sharding.index_codecs)
    index_crc = len(index_codecs) == 2 and isinstance(index_codecs[1], Crc32cCodec)
    location = getattr(sharding.index_location, "value", sharding.index_location)
    if codec is False or not index_codecs or not _little_endian_bytes(index_codecs[0]) \
            or (len(index_codecs) > 1 and not index_crc) or location not in ("start", "end"):
        return None
    clen, slen = int(node.chunks[0]), int(node.shards[0])
    if clen <= 0 or slen % clen:
        return None
    if index_crc:
        try:
            import numcodecs

            numcodecs.CRC32C()
        except (ImportError, AttributeError):  # pragma: no cover - zarr v3 installs numcodecs with crc32c
            return None
    return _Layout(root, codec, clen, slen // clen, location == "end", index_crc)


def decoded_size(codec: Any, raw: bytes) -> int | None:
    """Bytes that ``raw`` decodes to, read from its header (Blosc, or a Zstandard frame that records its
    content size), else ``None``. Decoding into a given buffer is only safe with this known: a codec
    writing fewer bytes than the buffer holds (a damaged chunk) does not say so."""
    import numcodecs

    if isinstance(codec, numcodecs.Blosc):  # 16-byte header; bytes 4..8: uncompressed size (uint32 LE)
        return int.from_bytes(raw[4:8], "little") if len(raw) >= 16 else None
    if isinstance(codec, numcodecs.Zstd):
        return _zstd_content_size(raw)
    return None


def _zstd_content_size(raw: bytes) -> int | None:
    """Frame_Content_Size of a single Zstandard frame (RFC 8878, 3.1.1.1), or ``None`` if absent."""
    if len(raw) < 6 or raw[:4] != b"\x28\xb5\x2f\xfd":
        return None
    fhd = raw[4]
    fcs_flag, single = fhd >> 6, (fhd >> 5) & 1
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
    size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if size == 0 or len(raw) < pos + size:
        return None
    value = int.from_bytes(raw[pos:pos + size], "little")
    return value + 256 if size == 2 else value


def _local_dir(node: Any, *, sharded_ok: bool = False) -> str | None:
    """The directory of a 1-D Zarr array in a local store (unsharded unless ``sharded_ok``); None for
    anything else."""
    if "zarr" not in sys.modules:  # not a zarr node (importing zarr to find out costs ~0.2 s per process)
        return None
    try:
        from zarr import Array
        from zarr.storage import LocalStore
    except ImportError:  # pragma: no cover - zarr is a dependency
        return None
    if not isinstance(node, Array) or len(node.shape) != 1 or not isinstance(node.store, LocalStore) \
            or (not sharded_ok and getattr(node, "shards", None) is not None):
        return None
    return os.path.join(str(node.store.root), node.path)


def _chunk_file(root: str, node: Any, k: int) -> str:
    """The file of chunk ``k`` (of shard ``k`` in a sharded array: the chunk grid is then the shards')."""
    return os.path.join(root, *node.metadata.encode_chunk_key((k,)).split("/"))


def _plan(node: Any) -> _Layout | None:
    """The array's chunk layout when the direct path applies."""
    root = _local_dir(node, sharded_ok=True)
    if root is None or node.dtype.kind not in "iuf" or not node.dtype.isnative:
        return None
    meta = node.metadata
    if meta.zarr_format == 2:
        if meta.filters:
            return None
        return _Layout(root, meta.compressor, int(node.chunks[0]))
    codecs = tuple(meta.codecs)
    if getattr(node, "shards", None) is not None:
        from zarr.codecs import ShardingCodec

        return _sharded_layout(root, node, codecs[0]) \
            if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec) else None
    codec = _v3_codec(codecs)
    return None if codec is False else _Layout(root, codec, int(node.chunks[0]))


#: per array directory, the last chunk a read decoded whole for part of it, with its stored bytes
#: (see :mod:`._kept_chunks`; a few MiB per array); a forked worker starts with its parent's.
_PARTIAL: dict[str, tuple[int, bytes, np.ndarray]] = {}


def _raw(path: str, k: int, node: Any) -> bytes:
    """The stored bytes of chunk ``k``; a missing file is an error (zarr would read it as zeros)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        msg = (f"{path}: chunk {k} of Zarr array '{node.path}' is missing (an interrupted copy?); zarr would "
               "read it as zeros. Copy the store again or re-export the file")
        raise InputFileError(msg) from None


def _decode(codec: Any, raw: bytes, path: str, k: int, node: Any, out: np.ndarray | None = None) -> Any:
    try:
        return codec.decode(raw, out=out) if out is not None else codec.decode(raw)
    except Exception as e:  # noqa: BLE001 - any codec failure means a damaged chunk
        msg = f"{path}: chunk {k} of Zarr array '{node.path}' cannot be decoded ({e}); re-export the file"
        raise InputFileError(msg) from None


class _StoredChunks:
    """The stored bytes of an array's chunks, for one read: a file per chunk, or chunks inside shard files
    (a shard's index is read and checked once per read; the file stays open while the read is in it)."""

    _ABSENT = (1 << 64) - 1  # a shard index entry (offset, length) of two of these: chunk not written

    def __init__(self, layout: _Layout, node: Any) -> None:
        self.layout, self.node = layout, node
        self._shard: tuple[int, Any, np.ndarray, int] | None = None  # (number, open file, index, file size)

    def __enter__(self) -> _StoredChunks:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._shard is not None:
            self._shard[1].close()
            self._shard = None

    def path(self, k: int) -> str:
        """The file holding chunk ``k``."""
        per = self.layout.per_shard
        return _chunk_file(self.layout.root, self.node, k // per if per else k)

    def raw(self, k: int) -> bytes:
        """The stored bytes of chunk ``k``; a missing file or chunk is an error (zarr would read zeros)."""
        per = self.layout.per_shard
        if not per:
            return _raw(self.path(k), k, self.node)
        s, j = divmod(k, per)
        f, index, size = self._open(s)
        offset, length = (int(v) for v in index[j])
        if offset == self._ABSENT and length == self._ABSENT:
            msg = (f"{self.path(k)}: chunk {k} of Zarr array '{self.node.path}' is missing from shard {s} (its "
                   "index marks it unwritten); zarr would read it as zeros. Re-export the file")
            raise InputFileError(msg)
        if offset + length > size:
            msg = (f"{self.path(k)}: chunk {k} of Zarr array '{self.node.path}' is truncated (shard {s}'s index "
                   f"places it at bytes {offset}..{offset + length} of a {size}-byte file); re-export the file")
            raise InputFileError(msg)
        f.seek(offset)
        return f.read(length)

    def _open(self, s: int) -> tuple[Any, np.ndarray, int]:
        if self._shard is not None and self._shard[0] == s:
            return self._shard[1:]
        self.__exit__()
        lay, path, name = self.layout, self.path(s * self.layout.per_shard), self.node.path
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by __exit__ or the next shard
        except FileNotFoundError:
            msg = (f"{path}: shard {s} of Zarr array '{name}' is missing (an interrupted copy?); zarr would read "
                   "its chunks as zeros. Copy the store again or re-export the file")
            raise InputFileError(msg) from None
        size, n = os.fstat(f.fileno()).st_size, lay.index_nbytes()
        if size >= n:
            f.seek(size - n if lay.index_at_end else 0)
        raw = f.read(n) if size >= n else b""
        why = f"the file has {size} bytes, its index alone {n}" if len(raw) < n else None
        if why is None and lay.index_crc:
            import numcodecs

            try:
                numcodecs.CRC32C().decode(raw)
            except Exception as e:  # noqa: BLE001 - a checksum mismatch
                why = str(e)
        if why is not None:
            f.close()
            msg = f"{path}: the chunk index of shard {s} of Zarr array '{name}' is damaged ({why}); re-export the file"
            raise InputFileError(msg)
        index = np.frombuffer(raw, dtype="<u8", count=2 * lay.per_shard).reshape(lay.per_shard, 2)
        self._shard = (s, f, index, size)
        return f, index, size


def _partial_chunk(root: str, path: str, k: int, node: Any, codec: Any, raw: bytes) -> np.ndarray:
    """Chunk ``k`` (stored as ``raw``) decoded whole (uint8), for a read of part of it (see :data:`_PARTIAL`)."""
    return kept_chunk(_PARTIAL, root, k, raw, lambda: np.frombuffer(
        raw if codec is None else _decode(codec, raw, path, k, node), dtype=np.uint8))


def read_direct(node: Any, sel: Any) -> np.ndarray | None:
    """``node[sel]`` for a plain slice of a 1-D local Zarr array, or ``None`` when not applicable."""
    bounds = plain_slice(node, sel)
    layout = None if bounds is None else _plan(node)
    if layout is None:
        return None
    codec, clen = layout.codec, layout.clen
    lo, hi = bounds
    dtype = node.dtype
    out = READS.empty(max(hi - lo, 0), dtype)  # reused memory: no zero-fill of a fresh map per read
    with _StoredChunks(layout, node) as stored:
        for k in range(lo // clen, (hi - 1) // clen + 1 if hi > lo else lo // clen):
            path, raw = stored.path(k), stored.raw(k)
            c0 = k * clen
            a, b = max(lo, c0), min(hi, c0 + clen)
            if a != c0 or b != c0 + clen:  # part of a chunk (a block boundary): kept for the next block's read
                whole = _partial_chunk(layout.root, path, k, node, codec, raw)
                chunk = whole[:whole.size - whole.size % dtype.itemsize].view(dtype)
            elif codec is not None and decoded_size(codec, raw) == clen * dtype.itemsize:
                _decode(codec, raw, path, k, node, out=out[a - lo:b - lo])  # straight into the output
                continue
            else:
                chunk = np.frombuffer(raw if codec is None else _decode(codec, raw, path, k, node), dtype=dtype)
            if chunk.size < b - c0:
                msg = f"{path}: chunk {k} of Zarr array '{node.path}' is truncated; re-export the file"
                raise InputFileError(msg)
            out[a - lo:b - lo] = chunk[a - c0:b - c0]
    return out


#: per array directory, the last chunk zarr-python decoded whole for :func:`read_through_chunk`, with its stored
#: bytes (a hit needs the same bytes, as for :data:`_PARTIAL`)
_DECODED: dict[str, tuple[int, bytes, np.ndarray]] = {}


def read_through_chunk(node: Any, sel: Any) -> np.ndarray | None:
    """``node[sel]`` for a plain slice of a 1-D local Zarr array the direct path does not take (text: the obs
    index and string columns, filters), decoded by zarr a whole chunk at a time, the last chunk kept.

    zarr decodes a whole chunk for any part of it, and AnnData stores the obs index as one chunk of all
    cells: reading it block by block decoded it once per block, quadratic in the cells (a 200,000-cell
    store: 20 decodes of 200,000 strings, ~9% of a run's CPU). ``None`` when not applicable, or when a
    chunk file is missing (zarr's fill values are then its answer).
    """
    bounds = plain_slice(node, sel)
    root = None if bounds is None or bounds[1] <= bounds[0] else _local_dir(node)
    if root is None:
        return None
    lo, hi = bounds
    clen, n = int(node.chunks[0]), int(node.shape[0])
    parts = []
    for k in range(lo // clen, (hi - 1) // clen + 1):
        c0 = k * clen
        try:
            with open(_chunk_file(root, node, k), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        chunk = kept_chunk(_DECODED, root, k, raw, lambda c0=c0: np.asarray(node[c0:min(c0 + clen, n)]))
        parts.append(chunk[max(lo, c0) - c0:min(hi, c0 + clen) - c0])
    return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
