"""Zero-copy reads of contiguous, uncompressed 1-D HDF5 datasets (an h5ad's ``X/data``, ``indices``, ``indptr``).

An uncompressed CSR matrix written by anndata is stored as plain contiguous arrays in the file. Reading
a slice through h5py copies it from the page cache into a fresh array, and a fresh multi-MiB array is
zero-filled by the kernel first: on the 200,000-cell benchmark those two passes were ~17% of the whole
tokenize run's CPU. Here such a slice is a read-only memory map of just that byte range, so the tokenizer
reads the page cache directly; the map is released with the last array viewing it, so resident memory
stays bounded by the blocks in flight, as with copies.

Taken only when the layout is certain: a 1-D dataset with no filters and a native numeric dtype, stored
contiguously -- either contiguous storage, or chunks (anndata writes its arrays chunked) that are all
allocated and lie end to end in order in the file, as one write of the array leaves them. The file must be as long as the dataset says (a truncated file would turn
a read into SIGBUS: it is an error naming the file instead), and the mapped first elements must equal
h5py's own read of them; anything else reads through h5py.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from .._errors import InputFileError
from .base import plain_slice

#: elements compared with h5py's read when a dataset is first mapped
_PROBE = 64
# per dataset (file name, dataset name, file identity): the byte offset of its data, or None (not mappable)
_PLANS: dict[tuple[str, str, int, int], int | None] = {}


def _plan(node: Any) -> tuple[str, int] | None:
    if "h5py" not in sys.modules:  # not an h5py node (a Zarr run need not import h5py, ~35 ms)
        return None
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is a dependency
        return None
    if not isinstance(node, h5py.Dataset) or node.ndim != 1:
        return None
    dt = node.dtype
    if dt.kind not in "iuf" or not dt.isnative or node.file.driver != "sec2" or node.id.get_create_plist().get_nfilters():
        return None
    fname = node.file.filename
    st = os.stat(fname)
    key = (fname, node.name, st.st_ino, st.st_mtime_ns)
    if key not in _PLANS:
        _PLANS[key] = _check(node, fname, st.st_size)
    off = _PLANS[key]
    return None if off is None else (fname, off)


def _start(node: Any) -> int | None:
    """File offset of element 0 when the elements lie end to end from there, else ``None``."""
    if node.chunks is None:
        off = node.id.get_offset()
        return off if off is not None and node.id.get_storage_size() == node.nbytes else None
    step = node.chunks[0] * node.dtype.itemsize
    n = -(-node.shape[0] // node.chunks[0])
    if n == 0 or node.id.get_num_chunks() != n:
        return None  # chunks never written read as fill values: not in the file
    infos = []
    if hasattr(node.id, "chunk_iter"):  # one B-tree walk (HDF5 >= 1.12.3)
        node.id.chunk_iter(infos.append)
    else:  # pragma: no cover - older HDF5
        infos = [node.id.get_chunk_info(i) for i in range(n)]
    infos.sort(key=lambda c: c.chunk_offset)
    first = infos[0].byte_offset
    for i, c in enumerate(infos):
        if c.chunk_offset[0] != i * node.chunks[0] or c.byte_offset != first + i * step or c.size != step:
            return None
    return first


def _check(node: Any, fname: str, size: int) -> int | None:
    off = _start(node)
    if off is None:
        return None  # not allocated (never written) or not laid out end to end
    if off + node.nbytes > size:
        msg = (f"{fname}: dataset '{node.name}' runs past the end of the file ({size:,} bytes); the file is "
               "truncated (an interrupted copy?). Copy or export it again")
        raise InputFileError(msg)
    n = min(_PROBE, node.size)
    # the first and last elements, as h5py reads them
    for lo in (0, node.size - n):
        if n and not np.array_equal(np.asarray(node[lo:lo + n]), _map(fname, off, node.dtype, lo, lo + n), equal_nan=True):
            return None
    return off


def _map(fname: str, off: int, dtype: np.dtype, lo: int, hi: int) -> np.ndarray:
    if hi <= lo:
        return np.empty(0, dtype=dtype)
    m = np.memmap(fname, dtype=dtype, mode="r", offset=off + lo * dtype.itemsize, shape=(hi - lo,))
    return m.view(np.ndarray)  # a plain array; it keeps the map alive, which closes with the last view


def read_mapped(node: Any, sel: Any) -> np.ndarray | None:
    """``node[sel]`` for a plain slice of a contiguous uncompressed 1-D HDF5 dataset, as a read-only view of
    the file; ``None`` when not applicable."""
    bounds = plain_slice(node, sel)
    plan = None if bounds is None else _plan(node)
    if plan is None:
        return None
    return _map(plan[0], plan[1], node.dtype, *bounds)
