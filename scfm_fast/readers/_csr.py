"""CSR row blocks: dense -> CSR conversion, slicing, concatenation and re-chunking to a fixed size.

Sources read storage in blocks aligned to how the file is laid out (zarr chunks, HDF5 chunks, an
element budget); :func:`rechunk` turns that stream into chunks of exactly the size the caller asked
for, holding at most one source block plus one output chunk in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .obs import ObsBlock


def data_dtype(dtype: np.dtype) -> np.dtype:
    """The float dtype counts are handed out in: float32/float64 kept, others widened exactly.

    Integers of up to 16 bits and booleans fit float32 exactly; wider integers go to float64 so
    that no count is rounded.
    """
    dtype = np.dtype(dtype)
    if dtype in (np.float32, np.float64):
        return dtype
    if dtype.kind == "b" or (dtype.kind in "iu" and dtype.itemsize <= 2) or dtype == np.float16:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


@dataclass
class CSRBlock:
    """Rows ``start:start + n_rows`` of a matrix in CSR form, with their obs table (may be None)."""

    start: int
    indptr: np.ndarray  # int64, indptr[0] == 0
    indices: np.ndarray  # int32
    data: np.ndarray
    obs: ObsBlock | None = None

    @property
    def n_rows(self) -> int:
        return int(self.indptr.shape[0] - 1)

    def slice(self, lo: int, hi: int) -> CSRBlock:
        """Rows ``lo:hi`` relative to this block (indices/data and obs are views)."""
        a, b = int(self.indptr[lo]), int(self.indptr[hi])
        obs = None if self.obs is None else self.obs.slice(lo, hi)
        return CSRBlock(self.start + lo, self.indptr[lo : hi + 1] - a, self.indices[a:b], self.data[a:b], obs)


def make_block(start: int, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> CSRBlock:
    """Normalise raw CSR arrays: indptr rebased to 0 as int64, indices int32, float data."""
    indptr = np.asarray(indptr, dtype=np.int64)
    if indptr.size and indptr[0] != 0:
        indptr = indptr - indptr[0]
    return CSRBlock(
        start, indptr, np.asarray(indices, dtype=np.int32), np.asarray(data, dtype=data_dtype(data.dtype))
    )


def dense_to_csr(start: int, block: np.ndarray) -> CSRBlock:
    """Convert a dense 2-D block (rows = cells) to CSR, keeping non-zeros in row-major order.

    Vectorised (one ``flatnonzero`` over the block); NaNs count as non-zero and are kept.
    """
    block = np.ascontiguousarray(block)
    n_rows, n_cols = block.shape
    # A boolean mask first: flatnonzero and count_nonzero on bools are ~2x faster than on floats.
    mask = block != 0
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.count_nonzero(mask, axis=1), out=indptr[1:])
    flat = np.flatnonzero(mask)
    indices = (flat % max(n_cols, 1)).astype(np.int32)
    data = block.ravel()[flat].astype(data_dtype(block.dtype), copy=False)
    return CSRBlock(start, indptr, indices, data)


def dense_columns_to_csr(start: int, block: np.ndarray) -> CSRBlock:
    """:func:`dense_to_csr` of ``block.T`` for a genes x cells block (loom's layout), without transposing it.

    The transposed copy of a 33k-gene block was ~30% of reading a loom file (a strided copy of the
    whole dense block); here the non-zeros are found in the block's own order, then put in cell order
    by a stable sort on the cell (a radix sort on 16-bit cell numbers), which keeps each cell's genes
    ascending, as in ``dense_to_csr(start, block.T)``.
    """
    block = np.ascontiguousarray(block)
    n_genes, n_cells = block.shape
    flat = np.flatnonzero(block != 0)  # NaNs count as non-zero and are kept
    genes, cells = np.divmod(flat, max(n_cells, 1))
    order = np.argsort(cells.astype(np.int16 if n_cells <= 1 << 15 else np.int64), kind="stable")
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(np.bincount(cells, minlength=n_cells), out=indptr[1:])
    indices = genes[order].astype(np.int32)
    # values gathered in the block's order (a forward scan), then reordered in the small array: gathering
    # the block in cell order jumps a whole row of cells per element
    data = block.ravel()[flat][order].astype(data_dtype(block.dtype), copy=False)
    return CSRBlock(start, indptr, indices, data)


def concat_blocks(pieces: list[CSRBlock]) -> CSRBlock:
    """Concatenate consecutive row blocks into one (a single piece is returned as is)."""
    if len(pieces) == 1:
        return pieces[0]
    sizes = [p.indptr[-1] for p in pieces]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    indptr = np.concatenate([[0]] + [p.indptr[1:] + off for p, off in zip(pieces, offsets, strict=True)])
    obs = None
    if pieces[0].obs is not None:
        obs = ObsBlock.concat(p.obs for p in pieces)
    return CSRBlock(
        pieces[0].start,
        indptr.astype(np.int64),
        np.concatenate([p.indices for p in pieces]),
        np.concatenate([p.data for p in pieces]),
        obs,
    )


def rechunk(blocks: Iterable[CSRBlock], chunk_size: int) -> Iterator[CSRBlock]:
    """Re-cut a stream of consecutive row blocks into blocks of exactly ``chunk_size`` rows.

    The last block may be shorter.  No counts are copied when a chunk lies within one source block
    (its ``indices``/``data`` are then views into that block), so sources that cut their blocks at
    chunk boundaries are re-chunked for free.
    """
    pending: list[CSRBlock] = []
    n_pending = 0
    for blk in blocks:
        if not pending and blk.n_rows == chunk_size:
            yield blk
            continue
        pos = 0
        while pos < blk.n_rows:
            take = min(chunk_size - n_pending, blk.n_rows - pos)
            pending.append(blk.slice(pos, pos + take))
            n_pending += take
            pos += take
            if n_pending == chunk_size:
                yield concat_blocks(pending)
                pending, n_pending = [], 0
    if pending:
        yield concat_blocks(pending)
