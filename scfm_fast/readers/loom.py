"""Streaming reader for ``.loom`` files (HDF5; ``/matrix`` is genes x cells).

A chunk of cells is a column slice of ``/matrix`` (or ``/layers/NAME``), transposed to CSR.  Slices
are aligned to the HDF5 chunking along cells.  Per-cell metadata comes from ``/col_attrs``, gene
metadata from ``/row_attrs``; loompy stores text as fixed-length ASCII with XML character
references for other characters, which are decoded here.
"""

from __future__ import annotations

import html
import os
from typing import Any

import h5py
import numpy as np

from .._errors import InputFileError
from ._anndata_elems import Frame
from ._common import ChunkedReader, check_path, open_error, reading_structure
from ._nodes import ReadStats, is_array, node_keys, read_slice, to_str_array
from ._sources import DEFAULT_BLOCK_ELEMENTS, DEFAULT_BLOCK_ROWS, DenseSource

_FIX = "Pass a .loom file written by loompy (or convert with anndata.read_loom(...).write_h5ad)."
#: Cell-name attributes, in order of preference (loompy's default first).
CELL_NAME_ATTRS = ("CellID", "obs_names")
#: Gene-id attributes used when ``gene_id_column`` is not given, in order of preference
#: (``var_names`` is what ``AnnData.write_loom`` writes).
GENE_ID_ATTRS = ("ensembl_id", "Accession", "Gene", "var_names")


def _decode_loom_text(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "S":  # loom spec: 7-bit ASCII + XML character references
        return np.array([html.unescape(v) for v in np.char.decode(values, "ascii").tolist()], dtype=object)
    return to_str_array(values) if values.dtype.kind in "OUT" else values


class LoomAttrs(Frame):
    """``/col_attrs`` or ``/row_attrs`` as a row-range table; 1-D attributes are the columns."""

    def __init__(
        self, group: Any, length: int, *, path: str, what: str, stats: ReadStats, index_attrs: tuple[str, ...]
    ) -> None:
        self.group, self.length, self.path, self.what, self.stats = group, length, path, what, stats
        self._columns = [
            k for k in node_keys(group) if is_array(group[k]) and tuple(group[k].shape) == (length,)
        ]
        self._index_attr = next((a for a in index_attrs if a in self._columns), None)

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    @property
    def has_index(self) -> bool:
        return self._index_attr is not None

    def read_index(self, start: int, stop: int) -> np.ndarray:
        if self._index_attr is None:
            return np.arange(start, stop).astype(str).astype(object)
        return np.asarray(self.read_raw(self._index_attr, start, stop), dtype=object)

    def read_raw(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        self.check_columns([name])
        stop = self.length if stop is None else stop
        return _decode_loom_text(read_slice(self.group[name], slice(start, stop), self.stats))


class LoomReader(ChunkedReader):
    """Row-chunk reader for a ``.loom`` file.

    Parameters
    ----------
    path
        The ``.loom`` file.
    layer
        Read ``/layers/<layer>`` instead of ``/matrix``.
    use_raw
        Not supported by loom (raises if True).
    gene_id_column
        ``/row_attrs`` attribute to use as gene ids; default ``ensembl_id`` or ``Accession`` if
        present, else ``Gene`` (else ``var_names``).
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
        self.path = check_path(path, kind="loom file", fix=_FIX)
        try:
            self._file = h5py.File(self.path, "r", rdcc_nbytes=16 << 20)
        except OSError as err:
            raise open_error(self.path, err, kind="loom file", fix=_FIX) from None
        with reading_structure(self.path, close=self._file.close):
            self._setup(
                layer=layer,
                use_raw=use_raw,
                gene_id_column=gene_id_column,
                max_block_elements=max_block_elements,
                max_block_rows=max_block_rows,
            )

    def _setup(
        self,
        *,
        layer: str | None,
        use_raw: bool,
        gene_id_column: str | None,
        max_block_elements: int,
        max_block_rows: int,
    ) -> None:
        f, path = self._file, self.path
        self.stats = ReadStats()
        if "matrix" not in f or not is_array(f["matrix"]) or len(f["matrix"].shape) != 2:
            msg = f"{path}: not a loom file (no 2-D /matrix; found {sorted(f.keys())}). {_FIX}"
            raise InputFileError(msg)
        if use_raw:
            msg = f"{path}: loom files have no raw matrix; pass use_raw=False (and layer=NAME for a layer)."
            raise InputFileError(msg)
        matrix = f["matrix"]
        if layer is not None:
            available = sorted(k for k in node_keys(f["layers"]) if k) if "layers" in f else []
            if layer not in available:
                msg = (
                    f"{path}: no layer {layer!r}; available layers: "
                    f"{', '.join(map(repr, available)) or '(none)'}."
                )
                raise InputFileError(msg)
            matrix = f["layers"][layer]
        self.n_vars, self.n_obs = (int(s) for s in matrix.shape)
        for group in ("row_attrs", "col_attrs"):
            if group not in f:
                msg = f"{path}: not a loom file (no /{group}). {_FIX}"
                raise InputFileError(msg)
        self._obs = LoomAttrs(
            f["col_attrs"],
            self.n_obs,
            path=path,
            what="col_attrs (obs)",
            stats=self.stats,
            index_attrs=CELL_NAME_ATTRS,
        )
        if gene_id_column is None:
            available = self._probe_columns(f["row_attrs"])
            gene_id_column = next((a for a in GENE_ID_ATTRS if a in available), None)
            if gene_id_column is None:
                msg = (
                    f"{path}: /row_attrs has none of {list(GENE_ID_ATTRS)}; pass "
                    f"gene_id_column= one of {available}."
                )
                raise InputFileError(msg)
        self._var = LoomAttrs(
            f["row_attrs"],
            self.n_vars,
            path=path,
            what="row_attrs (var)",
            stats=self.stats,
            index_attrs=(gene_id_column,),
        )
        self._use_gene_ids(gene_id_column)
        self._source = DenseSource(
            matrix,
            stats=self.stats,
            cells_axis=1,
            max_block_elements=max_block_elements,
            max_block_rows=max_block_rows,
        )

    def _probe_columns(self, group: Any) -> list[str]:
        return [k for k in node_keys(group) if is_array(group[k]) and len(group[k].shape) == 1]

    def _close(self) -> None:
        if self._file.id.valid:
            self._file.close()
