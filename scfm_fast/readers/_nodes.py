"""Backend-neutral access to HDF5 (h5py) and Zarr nodes: kind tests, attributes, counted slicing.

h5py and zarr (v2 and v3 formats, through zarr-python 3) expose nearly the same API: groups are
mappings, arrays support basic slicing and have ``shape``/``dtype``/``attrs``.  The few places where
they differ (attribute value types, string dtypes) are normalised here so that the AnnData encoding
code in :mod:`._anndata_elems` does not care which backend it reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._buffers import READS
from ._h5_deflate import read_deflated
from ._h5_direct import read_mapped
from ._zarr_direct import read_direct, read_through_chunk
from .base import plain_slice


@dataclass
class ReadStats:
    """Counts of the array elements a reader has pulled from storage.

    Every read of matrix or metadata elements goes through :func:`read_slice`, so ``max_elements``
    is an upper bound on the size of any single read: this is what the bounded-memory tests check.
    """

    n_reads: int = 0
    total_elements: int = 0
    max_elements: int = 0

    def record(self, n_elements: int) -> None:
        """Account for one read of ``n_elements`` elements."""
        self.n_reads += 1
        self.total_elements += n_elements
        self.max_elements = max(self.max_elements, n_elements)


def is_array(node: Any) -> bool:
    """Whether ``node`` is an array (h5py Dataset / zarr Array) rather than a group."""
    return hasattr(node, "shape") and hasattr(node, "dtype") and not hasattr(node, "keys")


def node_keys(node: Any) -> list[str]:
    """Child names of a group (empty for arrays)."""
    return [] if is_array(node) else [str(k) for k in node.keys()]


def _normalise_attr(value: Any) -> Any:
    # h5py hands back bytes, numpy scalars and numpy arrays; zarr hands back JSON values.
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f" and value.size == 0:
            return []  # h5py stores an empty "column-order" as an empty float array
        return [_normalise_attr(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def get_attr(node: Any, key: str, default: Any = None) -> Any:
    """Attribute ``key`` of ``node`` as a plain Python value (str, int, list...), or ``default``."""
    attrs = node.attrs
    if key not in attrs:
        return default
    return _normalise_attr(attrs[key])


def get_raw_attr(node: Any, key: str, default: Any = None) -> Any:
    """Attribute without normalisation (needed for HDF5 object references)."""
    attrs = node.attrs
    return attrs[key] if key in attrs else default


def encoding_type(node: Any) -> str | None:
    """The AnnData ``encoding-type`` attribute of a node, if any."""
    enc = get_attr(node, "encoding-type")
    return None if enc is None else str(enc)


def is_string_dtype(dtype: np.dtype) -> bool:
    """Whether ``dtype`` holds text: fixed bytes/unicode, h5py vlen str, or numpy StringDType."""
    if dtype.kind in ("S", "U", "T"):
        return True
    # Object arrays are h5py variable-length strings or zarr v2 vlen-utf8 text in AnnData files.
    return dtype.kind == "O"


def to_str_array(values: np.ndarray) -> np.ndarray:
    """Return an ``object`` array of Python ``str`` from bytes / unicode / StringDType / object input."""
    values = np.asarray(values)
    kind = values.dtype.kind
    if kind == "S":
        return np.char.decode(values, "utf-8").astype(object)
    if kind in ("U", "T"):
        return values.astype(object)
    if kind == "O":
        if values.size and isinstance(values.flat[0], bytes):
            return _decode_bytes(values)
        return values
    return values.astype(str).astype(object)


def _decode_bytes(values: np.ndarray) -> np.ndarray:
    """An object array of UTF-8 ``bytes`` (h5py's variable-length strings) as ``str``.

    Joined, decoded and split once instead of one ``decode`` call per value (a 16,000-gene var index:
    ~1 ms instead of ~10). HDF5 strings hold no NUL, so the split gives back one string per value; when
    it does not (a NUL inside a value, or a value that is not bytes) each value is decoded on its own.
    """
    flat = values.ravel().tolist()
    try:
        parts = b"\x00".join(flat).decode("utf-8").split("\x00")
    except TypeError:  # some value is not bytes
        parts = []
    if len(parts) != len(flat):
        parts = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in flat]
    out = np.empty(len(parts), dtype=object)
    out[:] = parts
    return out.reshape(values.shape)


def read_slice(node: Any, sel: Any, stats: ReadStats) -> np.ndarray:
    """Read ``node[sel]`` as a numpy array and account for it in ``stats``."""
    out = read_direct(node, sel)  # local 1-D Zarr arrays: chunks decoded directly, missing ones refused
    if out is None:
        out = read_mapped(node, sel)  # contiguous uncompressed HDF5 arrays: a view of the file, no copy
    if out is None:
        out = read_deflated(node, sel)  # gzip HDF5 arrays: chunks inflated with libdeflate
    if out is None:
        out = _read_h5_into_pool(node, sel)  # other 1-D HDF5 slices (e.g. lzf): into reused memory
    if out is None:
        out = read_through_chunk(node, sel)  # other 1-D local Zarr arrays (text): a chunk decoded once
    if out is None:
        out = np.asarray(node[sel])
    stats.record(int(out.size))
    return out


def _read_h5_into_pool(node: Any, sel: Any) -> np.ndarray | None:
    """A plain slice of a 1-D numeric h5py dataset, read into a :data:`~scfm_fast._buffers.READS` array."""
    bounds = plain_slice(node, sel)
    if bounds is None or not hasattr(node, "read_direct") or node.dtype.kind not in "iuf":
        return None
    lo, hi = bounds
    if hi <= lo:
        return None
    out = READS.empty(hi - lo, node.dtype)
    node.read_direct(out, np.s_[lo:hi])
    return out


def storage_rows(node: Any, axis: int = 0) -> int | None:
    """Rows along ``axis`` of one storage unit (zarr shard or chunk, HDF5 chunk); None if contiguous."""
    shards = getattr(node, "shards", None)
    chunks = shards if shards is not None else getattr(node, "chunks", None)
    if not chunks:
        return None
    return int(chunks[axis])
