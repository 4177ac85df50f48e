"""Streaming reader for AnnData-Zarr stores (zarr format v2 and v3).

A local store is opened from its metadata files (:mod:`._zarr_local`), without importing zarr-python
(~0.25 s); zarr-python 3 opens anything else, and reads what the local nodes do not decode themselves.

Handles the current anndata encodings and the legacy layout of early anndata-zarr files (dense X,
obs/var as structured arrays with bytes fields), e.g. scanpy's ``10x-10k-subset.zarr``.  Dense X is
read in blocks aligned to the store's chunks (or shards) along cells, so each stored chunk is
decompressed exactly once.
"""

from __future__ import annotations

import math
import os
from typing import Any

from .._errors import InputFileError
from ._anndata_reader import AnnDataReader, _select_matrix
from ._common import _REEXPORT, check_path, reading_structure
from ._nodes import is_array
from ._sources import DEFAULT_BLOCK_ELEMENTS, DEFAULT_BLOCK_ROWS
from ._zarr_direct import _Layout, key_prefix, metadata_of
from ._zarr_local import open_local_group

_FIX = "Pass a directory written by anndata (adata.write_zarr)."


class ZarrReader(AnnDataReader):
    """Row-chunk reader for an AnnData-Zarr store (a directory, usually named ``*.zarr``).

    Parameters
    ----------
    path
        The store's root directory.
    layer
        Read ``layers/<layer>`` instead of ``X``.
    use_raw
        Read ``raw/X`` with ``raw/var`` instead of ``X``.
    gene_id_column
        var column to use as gene identifiers; default: the var index.
    max_block_elements, max_block_rows
        Bounds on a single storage read (elements) and on the cells of one read block.
    """

    decodes_chunks = True

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
        self.path = check_path(path, kind="AnnData-Zarr store", fix=_FIX)
        if not os.path.isdir(self.path):
            msg = f"{self.path}: is a file, not a Zarr directory store. {_FIX}"
            raise InputFileError(msg)
        try:
            root = open_local_group(self.path)
            if root is None:  # no v2 / v3 root group document: zarr-python decides (and says why not)
                import zarr

                root = zarr.open_group(self.path, mode="r")
        except Exception as err:  # zarr raises several types for "not a store"
            msg = f"{self.path}: not a Zarr store ({type(err).__name__}: {err}). {_FIX}"
            raise InputFileError(msg) from None
        with reading_structure(self.path):
            self._setup(
                root,
                layer=layer,
                use_raw=use_raw,
                gene_id_column=gene_id_column,
                max_block_elements=max_block_elements,
                max_block_rows=max_block_rows,
            )
            name, matrix, _ = _select_matrix(root, path=self.path, layer=layer, use_raw=use_raw)
        if not is_array(matrix):
            check_sparse_chunks(self.path, name, matrix)


def check_sparse_chunks(path: str, name: str, group: Any) -> None:
    """Every stored chunk (or shard) of a sparse group's ``indptr``/``indices``/``data`` must exist.

    zarr reads a missing chunk as its fill value, so a store copied incompletely would hand out zeros:
    cells would silently lose genes, vanish or merge.  A chunk of a sparse matrix's arrays is in
    practice never all zeros (zarr skips writing such chunks); the one exception, a run of empty first
    cells as long as an ``indptr`` chunk, cannot be told apart from damage and is refused too.
    """
    for key in ("indptr", "indices", "data"):
        if key not in group:
            continue
        arr = group[key]
        meta = metadata_of(arr)
        prefix = key_prefix(meta)
        if prefix is None or len(arr.shape) != 1:  # a key encoding not known here: nothing to check against
            return
        per_file = int((getattr(arr, "shards", None) or arr.chunks)[0])
        files = _Layout(os.path.join(path, *arr.path.split("/")), None, per_file, key_prefix=prefix)
        for i in range(math.ceil(int(arr.shape[0]) / per_file)):
            if not os.path.exists(files.file(i)):
                k = prefix + str(i)
                msg = (f"{path}: chunk {k!r} (number {i}) of {name}/{key} is missing from the store, so zarr "
                       f"would read it as zeros; {_REEXPORT}")
                raise InputFileError(msg)
