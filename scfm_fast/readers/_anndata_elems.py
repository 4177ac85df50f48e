"""AnnData on-disk encodings (HDF5 and Zarr alike): dataframes, columns and matrix elements.

Covers the encodings written by anndata >= 0.8 (``encoding-type`` attributes: ``dataframe``,
``categorical``, ``string-array``, ``nullable-integer``, ``nullable-boolean``,
``nullable-string-array``, ``csr_matrix``, ``csc_matrix``, dense arrays), anndata 0.7 categoricals
(``categories`` attribute pointing at ``__categories/<col>``) and pre-0.7 files (obs/var as
structured arrays, categories in ``uns/<col>_categories``, sparse groups tagged ``h5sparse_format``).

Frames are read *by row range*: nothing here loads a whole per-cell column unless asked to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import InputFileError
from ._nodes import (
    ReadStats,
    encoding_type,
    get_attr,
    get_raw_attr,
    is_array,
    is_string_dtype,
    node_keys,
    read_slice,
    to_str_array,
)
from .obs import Categorical, Column, Masked, ObsBlock, column_to_pandas


def _missing_column_error(
    path: str, what: str, name: str, available: list[str], hint: str = ""
) -> InputFileError:
    shown = ", ".join(repr(c) for c in available) if available else "(none)"
    return InputFileError(f"{path}: {what} has no column {name!r}; available columns: {shown}.{hint}")


class Frame:
    """Row-range access to a per-cell (obs) or per-gene (var) table.

    Subclasses implement the storage layout (:meth:`read_raw`); columns are exactly ``stop - start``
    rows, as numpy arrays or the pandas-free :mod:`~scfm_fast.readers.obs` columns.
    """

    path: str
    what: str  # "obs", "var", "raw/var", "col_attrs"... used in error messages
    length: int

    @property
    def columns(self) -> list[str]:
        raise NotImplementedError

    @property
    def has_index(self) -> bool:
        """Whether the table stores row names (otherwise names are row numbers)."""
        return True

    def read_index(self, start: int, stop: int) -> np.ndarray:
        """Row names ``start:stop`` as an object array of ``str``."""
        raise NotImplementedError

    def read_raw(self, name: str, start: int = 0, stop: int | None = None) -> Column:
        """Column ``name`` for rows ``start:stop`` (default: to the end), without pandas."""
        raise NotImplementedError

    def read_column(self, name: str, start: int = 0, stop: int | None = None) -> Any:
        """Column ``name`` for rows ``start:stop`` as pandas holds it (numpy or an extension array)."""
        return column_to_pandas(self.read_raw(name, start, stop))

    def check_columns(self, names: list[str] | tuple[str, ...], *, hint: str = "") -> None:
        """Raise :class:`InputFileError` naming the file and listing the columns if one is missing."""
        available = self.columns
        for name in names:
            if name not in available:
                raise _missing_column_error(self.path, self.what, name, available, hint)

    def read_block(self, start: int, stop: int, names: list[str] | tuple[str, ...]) -> ObsBlock:
        """Rows ``start:stop`` with the requested columns, and the row names as ``str``."""
        return ObsBlock(self.read_index(start, stop), {n: self.read_raw(n, start, stop) for n in names})


def _categorical(frame: Frame, name: str, codes: np.ndarray, categories: np.ndarray, *,
                 ordered: bool) -> Categorical:
    """A categorical column whose codes are -1 (missing) or a category (as pandas checks them)."""
    codes = np.asarray(codes)
    if codes.dtype.kind not in "iu" or (codes.size and (codes.min() < -1 or codes.max() >= len(categories))):
        msg = (f"{frame.path}: categorical column {name!r} of {frame.what} holds codes outside "
               f"[-1, {len(categories) - 1}] (it has {len(categories)} categories); the file is damaged. "
               "Rewrite it with anndata.")
        raise InputFileError(msg)
    return Categorical(codes, categories, ordered)


def _decode_values(values: np.ndarray) -> np.ndarray:
    return to_str_array(values) if is_string_dtype(values.dtype) else values


class GroupFrame(Frame):
    """A dataframe stored as a group (anndata >= 0.7): one element per column plus ``_index``."""

    def __init__(self, node: Any, *, path: str, what: str, stats: ReadStats) -> None:
        self.node, self.path, self.what, self.stats = node, path, what, stats
        self._index_key = str(get_attr(node, "_index", "_index"))
        if self._index_key not in node:
            msg = (
                f"{path}: {what} has no index element {self._index_key!r}; "
                "the file is not a valid AnnData. Rewrite it with anndata."
            )
            raise InputFileError(msg)
        order = get_attr(node, "column-order")
        if order is None:  # very old writers: every child except the index and category store
            order = [k for k in node_keys(node) if k not in (self._index_key, "__categories")]
        self._columns = [str(c) for c in order]
        self.length = int(node[self._index_key].shape[0])
        self._categories: dict[str, np.ndarray] = {}

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    def read_index(self, start: int, stop: int) -> np.ndarray:
        return to_str_array(read_slice(self.node[self._index_key], slice(start, stop), self.stats))

    def categorical(self, name: str, cats_node: Any, codes: np.ndarray, *, ordered: bool) -> Categorical:
        """Build a categorical from per-chunk ``codes`` (-1 = missing) and the column's categories."""
        # Categories are per-category, not per-cell: read them once and reuse them for every chunk.
        if name not in self._categories:
            self._categories[name] = _decode_values(np.asarray(cats_node[...]))
        return _categorical(self, name, codes, self._categories[name], ordered=ordered)

    def read_raw(self, name: str, start: int = 0, stop: int | None = None) -> Column:
        if name not in self._columns or name not in self.node:
            raise _missing_column_error(self.path, self.what, name, self._columns)
        stop = self.length if stop is None else stop
        node, sel = self.node[name], slice(start, stop)
        if is_array(node):
            cats_ref = get_raw_attr(node, "categories")
            if cats_ref is not None:  # anndata 0.7 categorical: codes + reference to categories
                if isinstance(cats_ref, bytes):
                    cats_ref = cats_ref.decode()
                cats_node = self.node[cats_ref]
                codes = read_slice(node, sel, self.stats)
                return self.categorical(
                    name, cats_node, codes, ordered=bool(get_attr(cats_node, "ordered", default=False))
                )
            return _decode_values(read_slice(node, sel, self.stats))
        return _read_encoded_group(self, name, node, sel)


def _read_encoded_group(frame: GroupFrame, name: str, node: Any, sel: slice) -> Column:
    enc = encoding_type(node)
    stats = frame.stats
    if enc == "categorical":
        codes = read_slice(node["codes"], sel, stats)
        return frame.categorical(
            name, node["categories"], codes, ordered=bool(get_attr(node, "ordered", default=False))
        )
    if enc in ("nullable-integer", "nullable-boolean", "nullable-string-array"):
        values = read_slice(node["values"], sel, stats)
        mask = read_slice(node["mask"], sel, stats).astype(bool)
        if enc == "nullable-string-array":
            values = to_str_array(values)
        return Masked(values, mask, enc.split("-")[1])
    msg = (
        f"{frame.path}: column {name!r} of {frame.what} has encoding {enc!r}, which "
        "scfm_fast cannot read per row. Convert it to a plain column before tokenizing."
    )
    raise InputFileError(msg)


class StructuredFrame(Frame):
    """Pre-0.7 AnnData table: one structured (compound) array; the first field is the index."""

    def __init__(self, node: Any, *, path: str, what: str, stats: ReadStats, uns: Any | None = None) -> None:
        self.node, self.path, self.what, self.stats, self.uns = node, path, what, stats, uns
        fields = list(node.dtype.names or ())
        if not fields:
            msg = (
                f"{path}: {what} is neither a dataframe group nor a structured array; "
                "the file is not a valid AnnData."
            )
            raise InputFileError(msg)
        self._index_field = fields[0]
        self._columns = fields[1:]
        self.length = int(node.shape[0])
        self._categories: dict[str, np.ndarray] = {}

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    def _rows(self, start: int, stop: int) -> np.ndarray:
        return read_slice(self.node, slice(start, stop), self.stats)

    def read_index(self, start: int, stop: int) -> np.ndarray:
        return to_str_array(self._rows(start, stop)[self._index_field])

    def _from_rows(self, rows: np.ndarray, name: str) -> Column:
        if name not in self._columns:
            raise _missing_column_error(self.path, self.what, name, self._columns)
        values = _decode_values(np.ascontiguousarray(rows[name]))
        key = f"{name}_categories"
        if self.uns is not None and key in self.uns and values.dtype.kind in "iu":
            # Pre-0.7 categoricals: integer codes here, category labels in uns (read once).
            if name not in self._categories:
                self._categories[name] = _decode_values(np.asarray(self.uns[key][...]))
            return _categorical(self, name, values, self._categories[name], ordered=False)
        return values

    def read_raw(self, name: str, start: int = 0, stop: int | None = None) -> Column:
        stop = self.length if stop is None else stop
        return self._from_rows(self._rows(start, stop), name)

    def read_block(self, start: int, stop: int, names: list[str] | tuple[str, ...]) -> ObsBlock:
        # One read of the compound rows serves the index and every column.
        rows = self._rows(start, stop)
        return ObsBlock(to_str_array(rows[self._index_field]), {n: self._from_rows(rows, n) for n in names})


def open_frame(node: Any, *, path: str, what: str, stats: ReadStats, uns: Any | None = None) -> Frame:
    """Wrap an AnnData obs/var element (group or legacy structured array) as a :class:`Frame`."""
    if is_array(node):
        return StructuredFrame(node, path=path, what=what, stats=stats, uns=uns)
    enc = encoding_type(node)
    if enc not in (None, "dataframe"):
        msg = f"{path}: {what} has encoding {enc!r}, expected a dataframe; the file is not a valid AnnData."
        raise InputFileError(msg)
    return GroupFrame(node, path=path, what=what, stats=stats)


@dataclass
class MatrixElem:
    """Where a cell x gene matrix lives and how it is encoded."""

    kind: str  # "csr", "csc" or "dense"
    shape: tuple[int, int]
    node: Any  # the group (sparse) or the 2-D array (dense)


def describe_matrix(node: Any, *, path: str, name: str) -> MatrixElem:
    """Identify the encoding of an AnnData matrix element (``X``, ``layers/NAME``, ``raw/X``)."""
    if is_array(node):
        if len(node.shape) != 2:
            msg = f"{path}: {name} has shape {tuple(node.shape)}; expected a 2-D cell x gene matrix."
            raise InputFileError(msg)
        return MatrixElem("dense", (int(node.shape[0]), int(node.shape[1])), node)
    enc = encoding_type(node)
    legacy = get_attr(node, "h5sparse_format")
    if enc in ("csr_matrix", "csc_matrix") or legacy in ("csr", "csc"):
        kind = (enc or "")[:3] or str(legacy)
        shape = get_attr(node, "shape", None) or get_attr(node, "h5sparse_shape", None)
        missing = [k for k in ("data", "indices", "indptr") if k not in node]
        if shape is None or missing:
            msg = (
                f"{path}: sparse matrix {name} lacks {missing or ['shape']}; the file "
                "is damaged or not an AnnData."
            )
            raise InputFileError(msg)
        return MatrixElem(kind, (int(shape[0]), int(shape[1])), node)
    msg = (
        f"{path}: {name} has encoding {enc!r}; scfm_fast reads csr_matrix, csc_matrix "
        "and dense arrays. Rewrite the file with anndata (X as a CSR matrix)."
    )
    raise InputFileError(msg)
