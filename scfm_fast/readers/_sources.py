"""Row-block sources: read a stored matrix as consecutive CSR blocks of cells, in bounded memory.

One class per storage layout.  Each yields :class:`~._csr.CSRBlock` s covering rows ``start`` to the
end, sized so that no single read exceeds ``max_block_elements`` array elements (except where one
storage chunk or one cell is larger than that, which the file's layout forces).  Indices within a
row come out sorted for dense and CSC sources, and as stored for CSR sources.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from ._csr import CSRBlock, dense_columns_to_csr, dense_to_csr, make_block
from ._nodes import ReadStats, read_slice, storage_rows

#: Default element budget of one read (16 Mi elements: 64 MiB of float32).
DEFAULT_BLOCK_ELEMENTS = 1 << 24
#: Default cap on the cells in one source block (bounds per-block obs reads too).
DEFAULT_BLOCK_ROWS = 1 << 16
#: CSC files already warned about in this process (the warning is given once per file).
_CSC_WARNED: set[str] = set()


class DenseSource:
    """A dense 2-D array; ``cells_axis=1`` for loom's genes x cells layout.

    Blocks are aligned to the array's storage chunks (zarr shard/chunk or HDF5 chunk) along the cell
    axis, so that each stored chunk is decompressed once.
    """

    def __init__(
        self,
        arr: Any,
        *,
        stats: ReadStats,
        cells_axis: int = 0,
        max_block_elements: int = DEFAULT_BLOCK_ELEMENTS,
        max_block_rows: int = DEFAULT_BLOCK_ROWS,
    ) -> None:
        self.arr, self.stats, self.cells_axis = arr, stats, cells_axis
        self.n_rows = int(arr.shape[cells_axis])
        self.n_cols = int(arr.shape[1 - cells_axis])
        unit = storage_rows(arr, cells_axis) or 1
        budget_rows = max(1, min(max_block_rows, max_block_elements // max(self.n_cols, 1)))
        # A whole number of storage chunks per block; at least one, since reading part of a chunk
        # decompresses all of it anyway.
        self.block_rows = max(unit, (budget_rows // unit) * unit)

    def iter_blocks(self, start: int, chunk_size: int) -> Iterator[CSRBlock]:
        """Yield CSR blocks from row ``start`` to the end (aligned to storage, not to chunks)."""
        r = start
        while r < self.n_rows:
            end = min(self.n_rows, (r // self.block_rows + 1) * self.block_rows)
            if self.cells_axis == 0:
                yield dense_to_csr(r, read_slice(self.arr, slice(r, end), self.stats))
            else:
                yield dense_columns_to_csr(r, read_slice(self.arr, (slice(None), slice(r, end)), self.stats))
            r = end


class CSRSource:
    """A CSR group (``data``, ``indices``, ``indptr``): rows are contiguous ranges of data/indices.

    Blocks are cut at chunk boundaries and hold as many whole chunks as fit the element budget, so
    that re-chunking never copies counts.  A single chunk larger than the budget is read whole: its
    output needs that memory anyway, and one read avoids a concatenation.
    """

    def __init__(
        self,
        group: Any,
        shape: tuple[int, int],
        *,
        stats: ReadStats,
        max_block_elements: int = DEFAULT_BLOCK_ELEMENTS,
        max_block_rows: int = DEFAULT_BLOCK_ROWS,
    ) -> None:
        self.data, self.indices, self.indptr = group["data"], group["indices"], group["indptr"]
        self.n_rows, self.n_cols = shape
        self.stats, self.budget = stats, max_block_elements
        nnz = int(self.data.shape[0])
        # Rows per indptr window, from the mean row length: about two budgets' worth of entries, so
        # that re-reading the unused tail of a window stays cheap.
        mean = max(nnz / max(self.n_rows, 1), 1e-9)
        self.window = int(max(1, min(max_block_rows, max_block_elements, 2 * max_block_elements / mean)))

    def iter_blocks(self, start: int, chunk_size: int) -> Iterator[CSRBlock]:
        """Yield CSR blocks from row ``start`` to the end, each a whole number of chunks."""
        r = start
        while r < self.n_rows:
            w_rows = max(chunk_size, (self.window // chunk_size) * chunk_size)
            w_end = min(self.n_rows, r + w_rows)
            ip = read_slice(self.indptr, slice(r, w_end + 1), self.stats).astype(np.int64)
            fit = int(np.searchsorted(ip - ip[0], self.budget, side="right")) - 1
            n = max((fit // chunk_size) * chunk_size, min(chunk_size, w_end - r))
            n = min(n, w_end - r)
            lo, hi = int(ip[0]), int(ip[n])
            indices = read_slice(self.indices, slice(lo, hi), self.stats)
            data = read_slice(self.data, slice(lo, hi), self.stats)
            yield make_block(r, ip[: n + 1], indices, data)
            r += n


class CSCSource:
    """A CSC group read by rows: each row block scans all stored entries in bounded pieces.

    Every row block costs one pass over ``indices`` (and the matching parts of ``data``), so blocks
    are made as large as the budget allows.  The result equals the CSR path exactly, with column
    indices sorted within each row.
    """

    def __init__(
        self,
        group: Any,
        shape: tuple[int, int],
        *,
        stats: ReadStats,
        path: str,
        max_block_elements: int = DEFAULT_BLOCK_ELEMENTS,
        max_block_rows: int = DEFAULT_BLOCK_ROWS,
    ) -> None:
        self.data, self.indices = group["data"], group["indices"]
        self.n_rows, self.n_cols = shape
        self.stats = stats
        # Entries scanned per read: small enough that the per-scan temporaries stay modest.
        self.step = max(1, min(max_block_elements, 1 << 22))
        # indptr runs over genes, not cells: its size does not grow with the number of cells.
        self.col_ptr = read_slice(group["indptr"], slice(None), stats).astype(np.int64)
        nnz = int(self.col_ptr[-1])
        # Expected entries per row block ~ budget; bigger blocks mean fewer full scans.
        rows = max_block_elements * self.n_rows // max(nnz, 1)
        self.block_rows = int(max(1, min(rows, max(max_block_rows, 1), max_block_elements)))
        if path in _CSC_WARNED:
            return
        _CSC_WARNED.add(path)
        warnings.warn(
            f"{path}: the matrix is stored as CSC (gene-major); reading it by cells needs a pass over "
            "all entries for every block of cells, which is much slower than CSR. Convert it once, e.g. "
            "`adata.X = adata.X.tocsr(); adata.write_h5ad(...)`.",
            UserWarning,
            stacklevel=6,  # the caller of open_reader (via make_source, _setup, __init__)
        )

    def _scan(self, r0: int, r1: int) -> CSRBlock:
        n = r1 - r0
        rows, vals = [], []
        per_col = np.zeros(self.n_cols, dtype=np.int64)
        nnz = int(self.col_ptr[-1])
        for p in range(0, nnz, self.step):
            idx = read_slice(self.indices, slice(p, min(nnz, p + self.step)), self.stats)
            hit = np.flatnonzero((idx >= r0) & (idx < r1))
            if hit.size == 0:
                continue
            lo, hi = int(hit[0]), int(hit[-1]) + 1
            span = read_slice(self.data, slice(p + lo, p + hi), self.stats)  # only where hits are
            rows.append((idx[hit] - r0).astype(np.int32))
            vals.append(span[hit - lo])
            cols = np.searchsorted(self.col_ptr, p + hit, side="right") - 1
            per_col += np.bincount(cols, minlength=self.n_cols)
        if not rows:
            empty = np.zeros(0, dtype=self.data.dtype)
            return make_block(r0, np.zeros(n + 1, np.int64), np.zeros(0, np.int32), empty)
        # Hits arrive in column order, i.e. they form the CSC matrix of rows r0:r1; scipy's
        # counting-based CSC -> CSR conversion is O(entries) and leaves columns sorted in each row.
        col_ptr = np.zeros(self.n_cols + 1, dtype=np.int64)
        np.cumsum(per_col, out=col_ptr[1:])
        import scipy.sparse as sp  # here only: CSC input is rare, and scipy costs ~0.1 s to import

        block = sp.csc_matrix((np.concatenate(vals), np.concatenate(rows), col_ptr), shape=(n, self.n_cols))
        del rows, vals
        csr = block.tocsr()
        return make_block(r0, csr.indptr, csr.indices, csr.data)

    def iter_blocks(self, start: int, chunk_size: int) -> Iterator[CSRBlock]:
        """Yield CSR blocks from row ``start`` to the end, each a whole number of chunks if possible."""
        rows = max(chunk_size, (self.block_rows // chunk_size) * chunk_size)
        r = start
        while r < self.n_rows:
            end = min(self.n_rows, r + rows)
            yield self._scan(r, end)
            r = end
