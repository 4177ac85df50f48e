"""Streaming, bounded-memory readers for cell x gene count matrices (h5ad, AnnData-Zarr, loom).

Use :func:`open_reader`; every reader yields :class:`~scfm_fast.readers.base.CellChunk` s.
"""

from __future__ import annotations

import os
from pathlib import Path

from .._errors import InputFileError
from ._common import ChunkedReader, check_path
from .base import CellChunk, Reader

__all__ = ["CellChunk", "Reader", "open_reader"]

_SUFFIXES = {".h5ad": "h5ad", ".zarr": "zarr", ".loom": "loom"}


def _format_of(p: Path) -> str:
    suffix = p.suffix.lower()
    if suffix in _SUFFIXES:
        return _SUFFIXES[suffix]
    if p.is_dir():
        return "zarr"
    hint = ""
    if suffix in (".h5", ".hdf5"):
        hint = " A 10x/Cell Ranger .h5 can be converted with scanpy.read_10x_h5(path).write_h5ad(...)."
    elif suffix in (".mtx", ".gz", ".csv", ".tsv", ".txt"):
        hint = " Load it with scanpy/anndata and write it with adata.write_h5ad(...)."
    msg = (
        f"{p}: unsupported file type {suffix or '(no extension)'!r}; scfm_fast reads "
        f".h5ad files, AnnData-Zarr directories (.zarr) and .loom files.{hint}"
    )
    raise InputFileError(msg)


def open_reader(
    path: str | os.PathLike[str],
    *,
    layer: str | None = None,
    use_raw: bool = False,
    gene_id_column: str | None = None,
    max_block_rows: int | None = None,
) -> ChunkedReader:
    """Open a cell x gene source for streaming, choosing the reader from the path.

    Parameters
    ----------
    path
        ``*.h5ad`` file, AnnData-Zarr store (a directory, usually ``*.zarr``; zarr format v2 or v3)
        or ``*.loom`` file.
    layer
        Read this named layer (AnnData ``layers/NAME``, loom ``/layers/NAME``) instead of X.
    use_raw
        Read AnnData's ``raw/X`` with ``raw/var`` instead of X.
    gene_id_column
        var column (loom: ``/row_attrs`` attribute) holding the gene ids, e.g. ``"gene_ids"``;
        default: the var index (loom: ``ensembl_id``, else ``Accession``, else ``Gene``).
    max_block_rows
        Cap on the cells of one storage read (default: an element budget); a reader that serves one
        chunk at a time (a tokenize worker) passes its chunk size, so that it reads no further.

    Returns
    -------
    ChunkedReader
        A :class:`~scfm_fast.readers.base.Reader`; also a context manager.

    Raises
    ------
    InputFileError
        Missing or empty path, unsupported extension, not an AnnData/loom, missing layer or column.

    Examples
    --------
    >>> with open_reader("cells.h5ad") as r:  # doctest: +SKIP
    ...     for chunk in r.iter_chunks(chunk_size=10_000, obs_columns=["n_counts"]):
    ...         ...
    """
    p = Path(path)
    fmt = _format_of(p) if p.exists() else None
    if fmt is None:
        check_path(p, kind="file or directory", fix="Give an .h5ad file, a .zarr directory or a .loom file.")
    kw = {"layer": layer, "use_raw": use_raw, "gene_id_column": gene_id_column}
    if max_block_rows is not None:
        kw["max_block_rows"] = max_block_rows
    if fmt == "h5ad":
        from .h5ad import H5adReader

        return H5adReader(p, **kw)
    if fmt == "zarr":
        from .zarr import ZarrReader

        return ZarrReader(p, **kw)
    from .loom import LoomReader

    return LoomReader(p, **kw)
