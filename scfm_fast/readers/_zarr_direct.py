"""Direct chunk reads of 1-D Zarr arrays in a local directory store (``indptr``/``indices``/``data``).

zarr-python 3 routes every read through its asyncio event loop and codec pipeline; for the large
contiguous 1-D reads of a CSR matrix that costs more CPU than the decompression itself. Here the chunk
files are read and decoded with numcodecs directly (blosc, zstd, gzip, or none), straight into the
output array. Only layouts known exactly are taken, read from the array's metadata document (the same
planner for arrays opened by zarr-python and by :mod:`._zarr_local`): v2 without filters (any numcodecs
compressor); v3 ``bytes`` (little-endian) + at most one of blosc / zstd / gzip, either as the array's
codecs or inside ``sharding_indexed`` (shard files hold many chunks and an index of their byte ranges;
the index and its CRC32C are read and checked here). Anything else returns ``None`` and is read through
zarr.

A missing chunk file, or a chunk a shard's index marks as absent, is an error naming the file and chunk;
zarr would return fill values (zeros), silently dropping counts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._buffers import READS, BufferPool
from .._errors import InputFileError
from ._kept_chunks import kept_chunk
from .base import plain_slice


def _little_endian_bytes(codec: dict) -> bool:
    """``codec`` is v3's ``bytes`` codec storing little-endian (or single-byte) values, as this reader assumes."""
    endian = (codec.get("configuration") or {}).get("endian")
    return codec.get("name") == "bytes" and endian in (None, "little")


#: numcodecs decoders of the v3 bytes-to-bytes codecs taken here (each reads its settings from the stream)
_V3_COMPRESSORS = {"zstd": "Zstd", "blosc": "Blosc", "gzip": "GZip"}


def v3_compressor(codec: dict) -> Any | None:
    """The numcodecs decoder of a v3 bytes-to-bytes codec document (zstd, blosc, gzip), else ``None``."""
    import numcodecs

    name = _V3_COMPRESSORS.get(codec.get("name"))
    return None if name is None else getattr(numcodecs, name)()


def _v3_codec(codecs: Sequence[dict]) -> Any | None | bool:
    """numcodecs decoder for a v3 codec chain (metadata documents); ``None`` for uncompressed; ``False`` if
    unsupported.  A big-endian ``bytes`` codec is unsupported: its values would be read byte-swapped."""
    if not codecs or not _little_endian_bytes(codecs[0]) or len(codecs) > 2:
        return False
    if len(codecs) == 1:
        return None
    codec = v3_compressor(codecs[1])
    return False if codec is None else codec


@dataclass(frozen=True)
class _Layout:
    """How a 1-D array's chunks are stored: where, how encoded, and (sharded) how indexed."""

    root: str             # the array's directory
    codec: Any            # numcodecs decoder of one chunk; None: stored as raw bytes
    clen: int             # elements per chunk
    per_shard: int = 0    # chunks per shard file; 0: one file per chunk
    index_at_end: bool = True
    index_crc: bool = False
    key_prefix: str = ""  # chunk (shard) k is the file key_prefix + str(k) under root ("/" separates folders)

    def index_nbytes(self) -> int:
        return 16 * self.per_shard + (4 if self.index_crc else 0)

    def file(self, k: int) -> str:
        """The file of chunk ``k`` (of shard ``k`` in a sharded array: the file grid is then the shards')."""
        return os.path.join(self.root, *(self.key_prefix + str(k)).split("/"))


def key_prefix(meta: dict) -> str | None:
    """What precedes the number in a 1-D array's chunk keys (v2: nothing; v3: ``c/`` or ``c.``, or nothing
    with the ``v2`` key encoding); ``None`` for an encoding not known here."""
    if meta.get("zarr_format") == 2:
        return ""
    enc = meta.get("chunk_key_encoding") or {"name": "default"}
    sep = (enc.get("configuration") or {}).get("separator", "/" if enc.get("name") == "default" else ".")
    if sep not in ("/", "."):
        return None
    return {"default": "c" + sep, "v2": ""}.get(enc.get("name"))


def _v3_chunks(meta: dict) -> int | None:
    """Elements per file of a 1-D v3 array (a regular grid), else ``None``."""
    grid = meta.get("chunk_grid") or {}
    shape = (grid.get("configuration") or {}).get("chunk_shape") or ()
    return int(shape[0]) if grid.get("name") == "regular" and len(shape) == 1 and int(shape[0]) > 0 else None


def _sharded_layout(root: str, meta: dict, sharding: dict, prefix: str) -> _Layout | None:
    """The layout of a ``sharding_indexed`` array whose chunks and index this reader decodes, else None."""
    conf = sharding.get("configuration") or {}
    codec = _v3_codec(tuple(conf.get("codecs") or ()))
    index_codecs = tuple(conf.get("index_codecs") or ())
    index_crc = len(index_codecs) == 2 and index_codecs[1].get("name") == "crc32c"
    location = conf.get("index_location", "end")
    if codec is False or not index_codecs or not _little_endian_bytes(index_codecs[0]) \
            or (len(index_codecs) > 1 and not index_crc) or location not in ("start", "end"):
        return None
    inner, slen = tuple(conf.get("chunk_shape") or ()), _v3_chunks(meta)
    if len(inner) != 1 or slen is None or int(inner[0]) <= 0 or slen % int(inner[0]):
        return None
    clen = int(inner[0])
    if index_crc:
        try:
            import numcodecs

            numcodecs.CRC32C()
        except (ImportError, AttributeError):  # pragma: no cover - zarr v3 installs numcodecs with crc32c
            return None
    return _Layout(root, codec, clen, slen // clen, location == "end", index_crc, prefix)


def layout_of(root: str, meta: dict) -> _Layout | None:
    """The chunk layout of the 1-D array whose metadata document (``.zarray`` / ``zarr.json`` content) is
    ``meta``, stored under ``root``, when the direct path reads it: little-endian numbers, no filters,
    codecs known here.  The one planner for arrays opened by zarr-python and by :mod:`._zarr_local`."""
    prefix = key_prefix(meta)
    if prefix is None or len(meta.get("shape") or ()) != 1:
        return None
    if meta.get("zarr_format") == 2:
        dtype = _numeric_dtype(meta.get("dtype"))
        chunks = tuple(meta.get("chunks") or ())
        if dtype is None or meta.get("filters") or len(chunks) != 1 or int(chunks[0]) <= 0:
            return None
        compressor = meta.get("compressor")
        if compressor is None:
            return _Layout(root, None, int(chunks[0]), key_prefix=prefix)
        import numcodecs

        try:
            codec = numcodecs.get_codec(dict(compressor))
        except Exception:  # noqa: BLE001 - a codec numcodecs does not have: zarr reads (and reports) it
            return None
        return _Layout(root, codec, int(chunks[0]), key_prefix=prefix)
    if _numeric_dtype(meta.get("data_type")) is None or meta.get("storage_transformers"):
        return None
    codecs = tuple(meta.get("codecs") or ())
    if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed":
        return _sharded_layout(root, meta, codecs[0], prefix)
    codec, clen = _v3_codec(codecs), _v3_chunks(meta)
    return None if codec is False or clen is None else _Layout(root, codec, clen, key_prefix=prefix)


def _numeric_dtype(spec: Any) -> np.dtype | None:
    """The NumPy dtype of a v2 ``dtype`` or v3 ``data_type`` naming native-order integers or floats, else None."""
    if not isinstance(spec, str):
        return None
    try:
        dtype = np.dtype(spec)
    except TypeError:
        return None
    return dtype if dtype.kind in "iuf" and dtype.isnative else None


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
    if len(getattr(node, "shape", ())) != 1 or (not sharded_ok and getattr(node, "shards", None) is not None):
        return None
    local = getattr(node, "local_dir", None)  # an array of ._zarr_local: opened without zarr-python
    if local is not None:
        return local
    if "zarr" not in sys.modules:  # not a zarr node (importing zarr to find out costs ~0.2 s per process)
        return None
    try:
        from zarr import Array
        from zarr.storage import LocalStore
    except ImportError:  # pragma: no cover - zarr is a dependency
        return None
    if not isinstance(node, Array) or not isinstance(node.store, LocalStore):
        return None
    return os.path.join(str(node.store.root), node.path)


def metadata_of(node: Any) -> dict:
    """The metadata document of a Zarr array (``.zarray`` or ``zarr.json`` content, as a dict)."""
    meta = getattr(node, "json_meta", None)  # ._zarr_local's arrays keep theirs
    return meta if meta is not None else node.metadata.to_dict()


def _plan(node: Any) -> _Layout | None:
    """The array's chunk layout when the direct path applies."""
    root = _local_dir(node, sharded_ok=True)
    return None if root is None else layout_of(root, metadata_of(node))


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
        return self.layout.file(k // per if per else k)

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


#: memory the chunks kept in :data:`_PARTIAL` are decoded into, reused: every read block (a worker's chunk,
#: a piece of one in one process) starts and ends inside a storage chunk, decoded whole; into fresh memory,
#: the kernel zero-filled each one first (~2.4% of a Zarr v3 run's CPU when workers read 2,500-cell pieces)
_PARTIAL_MEMORY = BufferPool(max_buffers=4)


def _partial_chunk(root: str, path: str, k: int, node: Any, codec: Any, raw: bytes) -> np.ndarray:
    """Chunk ``k`` (stored as ``raw``) decoded whole (uint8), for a read of part of it (see :data:`_PARTIAL`)."""

    def decode() -> np.ndarray:
        if codec is None:
            return np.frombuffer(raw, dtype=np.uint8)
        n = decoded_size(codec, raw)
        if n is None:  # the size is not in the stream: the codec allocates
            return np.frombuffer(_decode(codec, raw, path, k, node), dtype=np.uint8)
        out = _PARTIAL_MEMORY.empty(n, np.uint8)  # handed out again only once this chunk is no longer kept
        _decode(codec, raw, path, k, node, out=out)
        return out

    return kept_chunk(_PARTIAL, root, k, raw, decode)


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
    prefix = None if root is None else key_prefix(metadata_of(node))
    if prefix is None:
        return None
    files = _Layout(root, None, int(node.chunks[0]), key_prefix=prefix)
    lo, hi = bounds
    clen, n = files.clen, int(node.shape[0])
    # ._zarr_local's text arrays decode a chunk's bytes themselves; zarr-python decodes a slice
    decode = getattr(node, "chunk_decoder", None)
    parts = []
    for k in range(lo // clen, (hi - 1) // clen + 1):
        c0 = k * clen
        try:
            with open(files.file(k), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        chunk = kept_chunk(_DECODED, root, k, raw, (lambda raw=raw: decode(raw)) if decode is not None
                           else (lambda c0=c0: np.asarray(node[c0:min(c0 + clen, n)])))
        parts.append(chunk[max(lo, c0) - c0:min(hi, c0 + clen) - c0])
    return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
