"""Streaming reader for ``.h5ad`` files (AnnData in HDF5), through h5py directly.

h5py slicing of ``X/indptr``, ``X/data`` and ``X/indices`` is much faster than anndata's backed
mode, and lets every read be bounded.  Encodings are handled in :mod:`._anndata_elems`.
"""

from __future__ import annotations

import os

import h5py

from ._anndata_reader import AnnDataReader
from ._common import check_path, open_error, reading_structure
from ._sources import DEFAULT_BLOCK_ELEMENTS, DEFAULT_BLOCK_ROWS

_FIX = "Pass an .h5ad written by anndata (adata.write_h5ad)."
#: HDF5 chunk cache per dataset: keeps small consecutive reads from re-decompressing chunks.
_CHUNK_CACHE_BYTES = 16 << 20


class H5adReader(AnnDataReader):
    """Row-chunk reader for an ``.h5ad`` file.

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    layer
        Read ``layers/<layer>`` instead of ``X``.
    use_raw
        Read ``raw/X`` with ``raw/var`` instead of ``X``.
    gene_id_column
        var column to use as gene identifiers; default: the var index.
    max_block_elements, max_block_rows
        Bounds on a single storage read (elements) and on the cells of one read block.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        layer: str | None = None,
        use_raw: bool = False,
        gene_id_column: str | None = None,
        max_block_elements: int = DEFAULT_BLOCK_ELEMENTS,
        max_block_rows: int = DEFAULT_BLOCK_ROWS,
    ) -> None:
        self.path = check_path(path, kind="h5ad file", fix=_FIX)
        try:
            self._file = h5py.File(self.path, "r", rdcc_nbytes=_CHUNK_CACHE_BYTES)
        except OSError as err:
            raise open_error(self.path, err, kind="h5ad file", fix=_FIX) from None
        with reading_structure(self.path, close=self._file.close):
            self._setup(
                self._file,
                layer=layer,
                use_raw=use_raw,
                gene_id_column=gene_id_column,
                max_block_elements=max_block_elements,
                max_block_rows=max_block_rows,
            )
        data = getattr(self._source, "data", None)  # a sparse matrix's counts (h5py dataset)
        self.decodes_chunks = data is not None and getattr(data, "compression", None) is not None

    def _close(self) -> None:
        if self._file.id.valid:
            self._file.close()
