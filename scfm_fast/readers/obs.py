"""Per-cell metadata of a block of cells without pandas: cell names plus named columns.

Readers hand out an :class:`ObsBlock`; ``CellChunk.obs`` turns it into a ``pandas.DataFrame`` on first
use. Why not a DataFrame from the start: importing pandas costs ~0.4 s, more than the rest of the
tokenize path together, and tokenization only needs the cell names and a few columns as numpy or Arrow.

A column is a numpy array, a :class:`Categorical` (AnnData's categorical encodings) or a
:class:`Masked` (AnnData's nullable integer / boolean / string encodings). Each converts to what pandas
would hold (:func:`column_to_pandas`), to an object array with ``None`` for missing values
(``numpy.asarray(col, dtype=object)``) and to Arrow (:func:`column_to_arrow`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Categorical:
    """Integer ``codes`` (-1 = missing) into ``categories``."""

    codes: np.ndarray
    categories: np.ndarray
    ordered: bool = False

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    def __getitem__(self, sel: slice) -> Categorical:
        return Categorical(self.codes[sel], self.categories, self.ordered)

    def __array__(self, dtype: Any = None, *, copy: bool | None = None) -> np.ndarray:
        out = np.empty(len(self), dtype=object)
        ok = self.codes >= 0
        out[ok] = np.asarray(self.categories, dtype=object)[self.codes[ok]]
        out[~ok] = None
        return out if dtype is None else out.astype(dtype)

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.Categorical.from_codes(self.codes, categories=self.categories, ordered=self.ordered)


@dataclass(frozen=True)
class Masked:
    """``values`` with a missing-value ``mask`` (True = missing); ``kind``: "integer", "float", "boolean", "string"."""

    values: np.ndarray
    mask: np.ndarray
    kind: str

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def __getitem__(self, sel: slice) -> Masked:
        return Masked(self.values[sel], self.mask[sel], self.kind)

    def __array__(self, dtype: Any = None, *, copy: bool | None = None) -> np.ndarray:
        out = self.values.astype(object)
        out[self.mask] = None
        return out if dtype is None else out.astype(dtype)

    def to_pandas(self) -> Any:
        import pandas as pd

        if self.kind == "integer":
            return pd.arrays.IntegerArray(self.values, self.mask)
        if self.kind == "float":
            return pd.arrays.FloatingArray(self.values, self.mask)
        if self.kind == "boolean":
            return pd.arrays.BooleanArray(self.values.astype(bool), self.mask)
        return pd.array(np.asarray(self, dtype=object), dtype="string")


Column = np.ndarray | Categorical | Masked


def column_to_pandas(col: Column) -> Any:
    """What pandas holds for ``col``: the numpy array itself, or a pandas extension array."""
    return col if isinstance(col, np.ndarray) else col.to_pandas()


def _is_text(col: Column) -> bool:
    return isinstance(col, Categorical) or (isinstance(col, Masked) and col.kind == "string") or (
        isinstance(col, np.ndarray) and col.dtype.kind in "OUST")


def is_missing(v: Any) -> bool:
    """None, NaN, pandas' NA / NaT: what ``pandas.isna`` calls missing for one value."""
    return v is None or (isinstance(v, float) and v != v) or type(v).__name__ in ("NAType", "NaTType")


def column_to_arrow(col: Column) -> Any:
    """``col`` as an Arrow array typed by its kind alone, so that every chunk gets the same type.

    Text and categorical columns become plain strings (shards share no dictionary), typed explicitly: a
    chunk whose values are all missing would otherwise be inferred as Arrow's null type. Missing values
    (NaN in float columns too) become nulls.
    """
    from .. import _arrow as arrow

    if _is_text(col):
        return arrow.strings([None if is_missing(v) else str(v) for v in np.asarray(col, dtype=object)])
    if isinstance(col, Masked):
        return arrow.array(col.values, mask=col.mask)
    if col.dtype.kind in "biuf":
        return arrow.array(col, mask=np.isnan(col) if col.dtype.kind == "f" else None)
    import pyarrow as pa  # dates, times, ...: pyarrow's own conversion

    return pa.array(col, from_pandas=True)


def column_to_float(col: Column) -> np.ndarray:
    """``col`` as float64, NaN where a value is missing or not a number (``pandas.to_numeric(errors="coerce")``)."""
    if isinstance(col, np.ndarray) and col.dtype.kind in "biuf":
        return col.astype(np.float64)
    if isinstance(col, Masked) and col.kind != "string":
        out = col.values.astype(np.float64)
        out[col.mask] = np.nan
        return out

    def number(v: Any) -> float:
        if is_missing(v) or isinstance(v, (bytes, bytearray)):
            return np.nan
        try:
            return float(v)
        except (TypeError, ValueError):
            return np.nan

    return np.array([number(v) for v in np.asarray(col, dtype=object)], dtype=np.float64)


def _concat(cols: Sequence[Column]) -> Column:
    first = cols[0]
    if isinstance(first, Categorical):
        return Categorical(np.concatenate([c.codes for c in cols]), first.categories, first.ordered)
    if isinstance(first, Masked):
        return Masked(np.concatenate([c.values for c in cols]), np.concatenate([c.mask for c in cols]), first.kind)
    return np.concatenate(cols)


class ObsBlock:
    """Cell names (``index``, an object array of ``str``) and named columns of equal length.

    Parameters
    ----------
    index
        The cells' names.
    columns
        Column name -> :data:`Column`, each as long as ``index``.
    """

    __slots__ = ("index", "columns")

    def __init__(self, index: np.ndarray, columns: dict[str, Column] | None = None) -> None:
        self.index = np.asarray(index, dtype=object)
        self.columns: dict[str, Column] = dict(columns or {})
        for name, col in self.columns.items():
            if len(col) != len(self.index):
                msg = f"obs column {name!r} has {len(col)} values for {len(self.index)} cells"
                raise ValueError(msg)

    @classmethod
    def empty(cls) -> ObsBlock:
        """No cells, no columns (a chunk built without metadata)."""
        return cls(np.empty(0, dtype=object))

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def __contains__(self, name: object) -> bool:
        return name in self.columns

    def __getitem__(self, name: str) -> Column:
        return self.columns[name]

    @property
    def names(self) -> list[str]:
        """Column names, in order."""
        return list(self.columns)

    def slice(self, lo: int, hi: int) -> ObsBlock:
        """Rows ``lo:hi`` (views where the columns allow)."""
        return ObsBlock(self.index[lo:hi], {k: v[lo:hi] for k, v in self.columns.items()})

    @staticmethod
    def concat(blocks: Iterable[ObsBlock]) -> ObsBlock:
        """Consecutive blocks with the same columns, joined."""
        blocks = list(blocks)
        if len(blocks) == 1:
            return blocks[0]
        index = np.concatenate([b.index for b in blocks])
        return ObsBlock(index, {k: _concat([b.columns[k] for b in blocks]) for k in blocks[0].columns})

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame`` indexed by the cell names (``str``), one column per column."""
        import pandas as pd

        return pd.DataFrame({k: column_to_pandas(v) for k, v in self.columns.items()},
                            index=pd.Index(self.index, dtype=object), columns=list(self.columns))

    @classmethod
    def from_pandas(cls, df: Any) -> ObsBlock:
        """A DataFrame's index (as ``str``) and columns; categorical and nullable columns keep their kind."""
        import pandas as pd

        cols: dict[str, Column] = {}
        for name in df.columns:
            s = df[name]
            if isinstance(s.dtype, pd.CategoricalDtype):
                cols[str(name)] = Categorical(s.cat.codes.to_numpy(), s.cat.categories.to_numpy(),
                                              bool(s.cat.ordered))
            elif isinstance(s.dtype, np.dtype) and s.dtype.kind != "O":
                cols[str(name)] = s.to_numpy()
            elif not pd.api.types.is_string_dtype(s.dtype) and isinstance(
                    getattr(s.dtype, "numpy_dtype", None), np.dtype) and s.dtype.numpy_dtype.kind in "biuf":
                # pandas' nullable Int*/UInt*/Float*/boolean
                kind = {"b": "boolean", "f": "float"}.get(s.dtype.numpy_dtype.kind, "integer")
                values = s.to_numpy(dtype=s.dtype.numpy_dtype, na_value=False if kind == "boolean" else 0)
                cols[str(name)] = Masked(values, s.isna().to_numpy(), kind)
            else:  # object, string and other extension columns: Python objects, missing as None
                cols[str(name)] = s.astype(object).where(s.notna(), None).to_numpy()
        return cls(np.asarray(df.index.astype(str), dtype=object), cols)
