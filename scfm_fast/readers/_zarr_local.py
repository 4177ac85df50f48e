"""AnnData-Zarr stores on a local disk opened from their metadata files (zarr formats v2 and v3), without
zarr-python.

Importing zarr-python takes ~0.25 s, which every ``scfm tokenize`` of a Zarr store paid in its parent before
any worker started (~5% of a 200,000-cell run on two cores, most of a small one), although the reads that
matter never go through zarr: the CSR arrays are decoded by :mod:`._zarr_direct`.  The nodes here answer
what the readers ask of a group or an array (membership, children, attributes, shape, dtype, chunks) from
the ``.zgroup`` / ``.zarray`` / ``.zattrs`` / ``zarr.json`` documents, and read 1-D arrays themselves:
numbers through :mod:`._zarr_direct`, text (``vlen-utf8``) by decoding its chunks with numcodecs.

Anything else goes to zarr-python, imported then: a read of another kind (an N-D slice, a structured or
unknown dtype, a filter or codec not known here, a text chunk that is missing) to zarr's array at the same
path, and a node this module cannot describe to zarr's node.  Their answers stay zarr's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from .._errors import InputFileError
from ._zarr_direct import read_direct, read_through_chunk, v3_compressor

#: v3 ``data_type`` names read as NumPy dtypes of the same name
_V3_NUMERIC = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                         "float16", "float32", "float64", "complex64", "complex128"})


def _load(path: str) -> dict | None:
    """A metadata document, or ``None`` when the file is absent; a file that is not JSON is an error naming it."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except FileNotFoundError:
        return None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        msg = f"{path}: damaged Zarr metadata ({e}); re-export or re-copy the store"
        raise InputFileError(msg) from None
    return doc if isinstance(doc, dict) else None


def _describe(store: str, path: str, fmt: int) -> tuple[str, dict, dict] | None:
    """``(kind, metadata document, attributes)`` of the node at ``path`` in a store of format ``fmt``
    (kind ``"group"`` or ``"array"``), or ``None`` when no node is there."""
    d = os.path.join(store, *[p for p in path.split("/") if p])
    if fmt == 3:
        meta = _load(os.path.join(d, "zarr.json"))
        if meta is None or meta.get("zarr_format") != 3 or meta.get("node_type") not in ("group", "array"):
            return None
        return meta["node_type"], meta, meta.get("attributes") or {}
    for kind, name in (("array", ".zarray"), ("group", ".zgroup")):
        meta = _load(os.path.join(d, name))
        if meta is not None:
            return kind, meta, _load(os.path.join(d, ".zattrs")) or {}
    return None


def open_local_group(store: str | os.PathLike[str]) -> LocalGroup | None:
    """The root group of the Zarr store in directory ``store``, read from its metadata files; ``None`` when
    the directory holds no v2 or v3 root group (the caller then asks zarr-python)."""
    store = os.fspath(store)
    for fmt in (3, 2):
        node = _describe(store, "", fmt)
        if node is not None and node[0] == "group":
            return LocalGroup(store, "", fmt, node[2])
    return None


class _Node:
    def __init__(self, store: str, path: str, fmt: int, attrs: dict) -> None:
        self.store, self.path, self.zarr_format = store, path, fmt
        self.attrs = attrs
        self._zarr_node: Any = None

    @property
    def name(self) -> str:
        return "/" + self.path

    def _zarr(self) -> Any:
        """zarr-python's node at this path (imported and opened on first use)."""
        if self._zarr_node is None:
            import zarr

            root = zarr.open_group(self.store, mode="r", zarr_format=self.zarr_format)
            self._zarr_node = root[self.path] if self.path else root
        return self._zarr_node


class LocalGroup(_Node):
    """A group of a local Zarr store: children, membership and attributes (read-only)."""

    def _child_path(self, name: str) -> str:
        return "/".join(p for p in (self.path, *str(name).split("/")) if p)

    def keys(self) -> list[str]:
        """Names of the child nodes, sorted (zarr's order is its store's directory listing or consolidated
        metadata, neither meaningful; the readers take a dataframe's column order from AnnData's
        ``column-order`` attribute, and from here only for writers too old to record one)."""
        d = os.path.join(self.store, *self.path.split("/")) if self.path else self.store
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if not n.startswith(".") and n != "zarr.json"
                      and _describe(self.store, self._child_path(n), self.zarr_format) is not None)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _describe(self.store, self._child_path(name), self.zarr_format) is not None

    def __getitem__(self, name: str) -> Any:
        path = self._child_path(name)
        node = _describe(self.store, path, self.zarr_format)
        if node is None:
            raise KeyError(name)
        kind, meta, attrs = node
        if kind == "group":
            return LocalGroup(self.store, path, self.zarr_format, attrs)
        array = LocalArray.describe(self.store, path, self.zarr_format, meta, attrs)
        return array if array is not None else self._zarr()[name]


class LocalArray(_Node):
    """An array of a local Zarr store: its description from ``meta``, and reads of 1-D slices (numbers and
    ``vlen-utf8`` text); other reads go to zarr-python (see the module's notes)."""

    def __init__(self, store: str, path: str, fmt: int, meta: dict, attrs: dict, *, dtype: np.dtype,
                 chunks: tuple[int, ...], shards: tuple[int, ...] | None, text_codecs: list | None) -> None:
        super().__init__(store, path, fmt, attrs)
        self.json_meta = meta
        self.local_dir = os.path.join(store, *path.split("/"))
        self.shape = tuple(int(n) for n in meta["shape"])
        self.dtype, self.chunks, self.shards = dtype, chunks, shards
        self._text_codecs = text_codecs  # numcodecs decoders, applied in order, of a text chunk's bytes
        #: a whole chunk decoded from its stored bytes, for text arrays (see
        #: :func:`._zarr_direct.read_through_chunk`); ``None`` for others
        self.chunk_decoder = self._decode_text if text_codecs is not None else None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @classmethod
    def describe(cls, store: str, path: str, fmt: int, meta: dict, attrs: dict) -> LocalArray | None:
        """The array, or ``None`` when its metadata holds what only zarr-python interprets (a data type or
        chunk grid not known here)."""
        try:
            if fmt == 2:
                return cls._v2(store, path, meta, attrs)
            return cls._v3(store, path, meta, attrs)
        except (KeyError, TypeError, ValueError, IndexError):
            return None

    @classmethod
    def _v2(cls, store: str, path: str, meta: dict, attrs: dict) -> LocalArray:
        spec = meta["dtype"]
        dtype = np.dtype(spec) if isinstance(spec, str) else np.dtype([tuple(f) for f in spec])
        filters = meta.get("filters") or []
        text = None
        if dtype.kind == "O" and [f.get("id") for f in filters] == ["vlen-utf8"]:
            import numcodecs

            compressor = meta.get("compressor")
            text = [numcodecs.get_codec(dict(compressor))] if compressor else []
            text.append(numcodecs.VLenUTF8())
        return cls(store, path, 2, meta, attrs, dtype=dtype, chunks=tuple(int(c) for c in meta["chunks"]),
                   shards=None, text_codecs=text)

    @classmethod
    def _v3(cls, store: str, path: str, meta: dict, attrs: dict) -> LocalArray | None:
        spec = meta["data_type"]
        grid = meta["chunk_grid"]
        if grid.get("name") != "regular" or not isinstance(spec, str):
            return None
        outer = tuple(int(c) for c in grid["configuration"]["chunk_shape"])
        codecs = list(meta.get("codecs") or ())
        chunks, shards = outer, None
        if codecs and codecs[0].get("name") == "sharding_indexed":
            chunks = tuple(int(c) for c in codecs[0]["configuration"]["chunk_shape"])
            shards = outer
        text = None
        if spec == "string":
            dtype = np.dtype(object)
            text = cls._v3_text(codecs)
        elif spec in _V3_NUMERIC:
            dtype = np.dtype(spec)
        else:
            return None
        return cls(store, path, 3, meta, attrs, dtype=dtype, chunks=chunks, shards=shards, text_codecs=text)

    @staticmethod
    def _v3_text(codecs: list[dict]) -> list | None:
        """Decoders of an unsharded v3 string array's chunk (``vlen-utf8`` and at most one compressor)."""
        import numcodecs

        if not codecs or codecs[0].get("name") != "vlen-utf8" or len(codecs) > 2:
            return None
        decoders = [v3_compressor(c) for c in codecs[1:]]
        return None if any(d is None for d in decoders) else [*decoders, numcodecs.VLenUTF8()]

    def _decode_text(self, raw: bytes) -> np.ndarray:
        buf: Any = raw
        for codec in self._text_codecs or ():
            buf = codec.decode(buf)
        return np.asarray(buf, dtype=object)

    def __getitem__(self, sel: Any) -> Any:
        one = slice(None) if sel is Ellipsis else sel
        if self.ndim == 1 and isinstance(one, slice):
            lo, hi, step = one.indices(self.shape[0])
            if step == 1:
                out = read_direct(self, one)
                if out is not None:
                    return out.copy()  # read_direct hands out reused memory; the caller keeps this
                if self._text_codecs is not None:
                    if hi <= lo:
                        return np.empty(0, dtype=object)
                    out = read_through_chunk(self, one)
                    if out is not None:
                        return out
        return self._zarr()[sel]
