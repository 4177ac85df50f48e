"""Direct chunk reads of 1-D Zarr arrays in a local directory store (``indptr``/``indices``/``data``).

zarr-python 3 routes every read through its asyncio event loop and codec pipeline; for the large
contiguous 1-D reads of a CSR matrix that costs more CPU than the decompression itself. Here the chunk
files are read and decoded with numcodecs directly (blosc, zstd, gzip, or none), straight into the
output array. Only layouts known exactly are taken (v2 without filters; v3 ``bytes`` + at most one of
those compressors, no sharding); anything else returns ``None`` and is read through zarr.

A missing chunk file is an error naming the file and chunk; zarr would return fill values (zeros),
silently dropping counts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .._buffers import READS
from .._errors import InputFileError
from .base import plain_slice


def _v3_codec(codecs: tuple[Any, ...]) -> Any | None | bool:
    """numcodecs decoder for a v3 codec chain; ``None`` for uncompressed; ``False`` if unsupported."""
    import numcodecs
    from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, ZstdCodec

    if not codecs or not isinstance(codecs[0], BytesCodec) or len(codecs) > 2:
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


def _local_dir(node: Any) -> str | None:
    """The directory of a 1-D, unsharded Zarr array in a local store; None for anything else."""
    if "zarr" not in sys.modules:  # not a zarr node (importing zarr to find out costs ~0.2 s per process)
        return None
    try:
        from zarr import Array
        from zarr.storage import LocalStore
    except ImportError:  # pragma: no cover - zarr is a dependency
        return None
    if not isinstance(node, Array) or len(node.shape) != 1 or not isinstance(node.store, LocalStore) \
            or getattr(node, "shards", None) is not None:
        return None
    return os.path.join(str(node.store.root), node.path)


def _chunk_file(root: str, node: Any, k: int) -> str:
    return os.path.join(root, *node.metadata.encode_chunk_key((k,)).split("/"))


def _plan(node: Any) -> tuple[str, Any, int] | None:
    """(array directory, decoder or None, chunk length) when the direct path applies."""
    root = _local_dir(node)
    if root is None or node.dtype.kind not in "iuf" or not node.dtype.isnative:
        return None
    meta = node.metadata
    if meta.zarr_format == 2:
        if meta.filters:
            return None
        codec = meta.compressor
    else:
        codec = _v3_codec(tuple(meta.codecs))
        if codec is False:
            return None
    return root, codec, int(node.chunks[0])


#: per array directory, the last chunk a read decoded whole for part of it, with its stored bytes: a read that
#: ends inside a chunk is usually followed by one that starts there (consecutive blocks of a file), which
#: then takes the rest without decoding the chunk again.  A hit needs the same stored bytes (compared: far
#: cheaper than decoding), so a rewritten store is never answered from here.  One chunk per array (a few
#: MiB); a forked worker starts with its parent's.
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


def _kept(cache: dict[str, tuple[int, bytes, np.ndarray]], root: str, k: int, raw: bytes,
          decode: Callable[[], np.ndarray]) -> np.ndarray:
    """Chunk ``k`` of the array at ``root`` decoded whole: the one ``cache`` keeps when it is this chunk with
    the same stored bytes ``raw``, else ``decode()``, kept in its place."""
    kept = cache.get(root)
    if kept is None or kept[0] != k or kept[1] != raw:
        kept = (k, raw, decode())
        cache[root] = kept
    return kept[2]


def _partial_chunk(root: str, path: str, k: int, node: Any, codec: Any) -> np.ndarray:
    """Chunk ``k`` decoded whole (uint8), for a read of part of it (see :data:`_PARTIAL`)."""
    raw = _raw(path, k, node)
    return _kept(_PARTIAL, root, k, raw, lambda: np.frombuffer(
        raw if codec is None else _decode(codec, raw, path, k, node), dtype=np.uint8))


def read_direct(node: Any, sel: Any) -> np.ndarray | None:
    """``node[sel]`` for a plain slice of a 1-D local Zarr array, or ``None`` when not applicable."""
    bounds = plain_slice(node, sel)
    plan = None if bounds is None else _plan(node)
    if plan is None:
        return None
    root, codec, clen = plan
    lo, hi = bounds
    dtype = node.dtype
    out = READS.empty(max(hi - lo, 0), dtype)  # reused memory: no zero-fill of a fresh map per read
    for k in range(lo // clen, (hi - 1) // clen + 1 if hi > lo else lo // clen):
        path = _chunk_file(root, node, k)
        c0 = k * clen
        a, b = max(lo, c0), min(hi, c0 + clen)
        if a != c0 or b != c0 + clen:  # part of a chunk (a block boundary): kept for the next block's read
            whole = _partial_chunk(root, path, k, node, codec)
            chunk = whole[:whole.size - whole.size % dtype.itemsize].view(dtype)
        else:
            raw = _raw(path, k, node)
            if codec is not None and decoded_size(codec, raw) == clen * dtype.itemsize:
                _decode(codec, raw, path, k, node, out=out[a - lo:b - lo])  # straight into the output
                continue
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
        chunk = _kept(_DECODED, root, k, raw, lambda c0=c0: np.asarray(node[c0:min(c0 + clen, n)]))
        parts.append(chunk[max(lo, c0) - c0:min(hi, c0 + clen) - c0])
    return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
