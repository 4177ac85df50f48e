"""Uniform, bounded-memory access to cell x gene count matrices.

Every reader yields :class:`CellChunk` objects: a block of consecutive cells as a CSR matrix
over the *source* gene columns, plus the requested per-cell metadata.  Nothing downstream of a
reader knows which file format the cells came from.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .obs import ObsBlock


class CellChunk:
    """A block of consecutive cells in CSR layout.

    Attributes
    ----------
    start
        Row index (in the source file) of the first cell of the chunk.
    indptr
        ``int64`` array of length ``n_cells + 1``.
    indices
        ``int32`` column indices into the source's gene axis (``Reader.var_names``).
    data
        Counts, ``float32`` or ``float64``; same length as ``indices``.
    obs
        Per-cell metadata for these cells as a ``pandas.DataFrame`` (index = cell names), holding the
        requested columns; built on first access (see :attr:`meta`).
    meta
        The same metadata as an :class:`~scfm_fast.readers.obs.ObsBlock`, without pandas.

    ``indices`` and ``data`` may be read-only (uncompressed h5ad arrays are memory maps of the file): copy
    them before writing into them. Keeping them is safe: memory the reader reuses is handed out again
    only once no view of it remains.
    """

    __slots__ = ("start", "indptr", "indices", "data", "_obs")

    def __init__(self, start: int, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray,
                 obs: Any = None) -> None:
        self.start, self.indptr, self.indices, self.data = start, indptr, indices, data
        # an ObsBlock (readers), a DataFrame (given by a caller), or None (no metadata)
        self._obs = ObsBlock.empty() if obs is None else obs

    @property
    def obs(self) -> Any:
        if isinstance(self._obs, ObsBlock):  # once a DataFrame exists it is the metadata (it may be edited)
            self._obs = self._obs.to_pandas()
        return self._obs

    @obs.setter
    def obs(self, value: Any) -> None:
        self._obs = ObsBlock.empty() if value is None else value

    @property
    def meta(self) -> ObsBlock:
        return self._obs if isinstance(self._obs, ObsBlock) else ObsBlock.from_pandas(self._obs)

    @property
    def n_cells(self) -> int:
        return int(self.indptr.shape[0] - 1)

    @property
    def stop(self) -> int:
        return self.start + self.n_cells

    def __repr__(self) -> str:
        return f"CellChunk(start={self.start}, n_cells={self.n_cells}, nnz={int(self.indptr[-1])})"


@runtime_checkable
class Reader(Protocol):
    """What every source reader provides (``h5ad``, AnnData-Zarr, loom)."""

    path: str
    n_obs: int
    n_vars: int

    @property
    def var_names(self) -> np.ndarray:
        """Gene identifiers (strings) of the gene axis, from ``gene_id_column`` or the var index."""

    @property
    def obs_columns(self) -> list[str]:
        """Names of the per-cell metadata columns available in the source."""

    def iter_chunks(
        self, *, start: int = 0, chunk_size: int = 10_000, obs_columns: Sequence[str] = ()
    ) -> Iterator[CellChunk]:
        """Yield consecutive :class:`CellChunk` s from row ``start`` to the end."""

    def close(self) -> None:
        """Release file handles."""


def plain_slice(node: Any, sel: Any) -> tuple[int, int] | None:
    """``(lo, hi)`` when ``sel`` is a step-1 slice of the 1-D array ``node`` (the reads the direct paths
    take), else ``None``."""
    if not isinstance(sel, slice) or sel.step not in (None, 1) or len(getattr(node, "shape", ())) != 1:
        return None
    lo, hi, _ = sel.indices(int(node.shape[0]))
    return lo, hi
