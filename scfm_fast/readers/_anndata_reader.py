"""Reader logic common to h5ad and AnnData-Zarr: choosing X / a layer / raw, obs, var, gene ids."""

from __future__ import annotations

from typing import Any

from .._errors import InputFileError
from ._anndata_elems import MatrixElem, describe_matrix, open_frame
from ._common import ChunkedReader, RowSource
from ._nodes import ReadStats, node_keys
from ._sources import DEFAULT_BLOCK_ELEMENTS, DEFAULT_BLOCK_ROWS, CSCSource, CSRSource, DenseSource


def _child(root: Any, *names: str) -> Any | None:
    """First of ``names`` present under ``root`` (handles pre-0.7 ``raw.X``-style keys)."""
    for name in names:
        if name in root:
            return root[name]
    return None


def make_source(
    elem: MatrixElem, *, stats: ReadStats, path: str, max_block_elements: int, max_block_rows: int
) -> RowSource:
    """The row-block source matching a matrix element's encoding."""
    kw = {"stats": stats, "max_block_elements": max_block_elements, "max_block_rows": max_block_rows}
    if elem.kind == "csc":
        # every CSC block costs a pass over all stored entries: a small cap on its cells (a worker's
        # chunk, the pipeline's pieces) would multiply the passes; the element budget bounds it
        kw["max_block_rows"] = max(max_block_rows, DEFAULT_BLOCK_ROWS)
    if elem.kind == "dense":
        return DenseSource(elem.node, **kw)
    if elem.kind == "csr":
        return CSRSource(elem.node, elem.shape, **kw)
    return CSCSource(elem.node, elem.shape, path=path, **kw)


def _layer_names(root: Any) -> list[str]:
    layers = _child(root, "layers")
    return sorted(node_keys(layers)) if layers is not None else []


def _select_matrix(root: Any, *, path: str, layer: str | None, use_raw: bool) -> tuple[str, Any, Any]:
    """The requested matrix element and its var table: ``(name, matrix node, var node)``."""
    if layer is not None:
        available = _layer_names(root)
        if layer not in available:
            shown = ", ".join(map(repr, available)) or "(none)"
            msg = f"{path}: no layer {layer!r}; available layers: {shown}. Pass one of them or layer=None for X."
            raise InputFileError(msg)
        return f"layers/{layer}", root["layers"][layer], root["var"]
    if use_raw:
        raw = _child(root, "raw")
        # anndata < 0.7 stored raw as top-level "raw.X" / "raw.var".
        matrix = _child(raw, "X") if raw is not None else _child(root, "raw.X")
        var_node = _child(raw, "var") if raw is not None else _child(root, "raw.var")
        if matrix is None or var_node is None:
            msg = (
                f"{path}: use_raw=True but the file has no raw/X with raw/var. Pass use_raw=False to read X."
            )
            raise InputFileError(msg)
        return "raw/X", matrix, var_node
    matrix = _child(root, "X")
    if matrix is None:
        msg = (
            f"{path}: the AnnData has no X. Pass layer= one of {_layer_names(root) or '(no layers either)'}, "
            "or use_raw=True if it has raw."
        )
        raise InputFileError(msg)
    return "X", matrix, root["var"]


class AnnDataReader(ChunkedReader):
    """Streams an AnnData stored in an HDF5 file or a Zarr store (the root group is ``root``)."""

    def _setup(
        self,
        root: Any,
        *,
        layer: str | None,
        use_raw: bool,
        gene_id_column: str | None,
        max_block_elements: int = DEFAULT_BLOCK_ELEMENTS,
        max_block_rows: int = DEFAULT_BLOCK_ROWS,
    ) -> None:
        path = self.path
        self.stats = ReadStats()
        if "obs" not in root or "var" not in root:
            msg = (
                f"{path}: not an AnnData (no 'obs' and 'var' elements; found "
                f"{sorted(node_keys(root))}). Write the data with anndata."
            )
            raise InputFileError(msg)
        if layer is not None and use_raw:
            msg = (
                f"{path}: layer={layer!r} and use_raw=True cannot be combined "
                "(AnnData's raw has no layers); pass one of them."
            )
            raise InputFileError(msg)
        name, matrix, var_node = _select_matrix(root, path=path, layer=layer, use_raw=use_raw)
        uns = _child(root, "uns")
        self._obs = open_frame(root["obs"], path=path, what="obs", stats=self.stats, uns=uns)
        self._var = open_frame(
            var_node, path=path, what="raw/var" if use_raw else "var", stats=self.stats, uns=uns
        )
        elem = describe_matrix(matrix, path=path, name=name)
        self.n_obs, self.n_vars = elem.shape
        self._check_shapes()
        self._use_gene_ids(gene_id_column)
        self._source = make_source(
            elem,
            stats=self.stats,
            path=path,
            max_block_elements=max_block_elements,
            max_block_rows=max_block_rows,
        )
