"""The arrays behind a :class:`~scfm_fast.store.cells.CellSource`, and how each kind of input fills them.

Every input becomes one flat token array plus ``offsets`` (cell ``i`` is ``tokens[offsets[i]:offsets[i+1]]``),
each cell's identity, optional per-token values, and where its metadata columns are read from.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .._errors import InputFileError, StoreError
from .schema import PACKED_DIR

log = logging.getLogger("scfm_fast")

#: optional packed arrays of GeneCompass datasets: float32 values aligned with the tokens (segments in
#: packed/values/; a values.npy in format /1 or hand-made stores), int8 species per cell (0 human, 1 mouse);
#: the same names are the shards' / tables' columns
VALUES_FILE, SPECIES_FILE = "values.npy", "species.npy"
SPECIES_COLUMN = "species"
IDENTITY = ("cell_index", "file_index")


class CellArrays:
    """Flat tokens + offsets (+ optional per-token values and per-cell species) and where the per-cell
    metadata lives."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, cell_index: np.ndarray, file_index: np.ndarray,
                 *, values: np.ndarray | None = None, species: np.ndarray | None = None,
                 table: pa.Table | None = None,
                 directory: Path | None = None) -> None:
        self.tokens, self.offsets, self.values, self.species = tokens, offsets, values, species
        self.cell_index, self.file_index = cell_index, file_index
        self.table, self.directory = table, directory
        self._names: list[str] | None = None

    def column_names(self) -> list[str]:
        if self._names is None:
            if self.table is not None:
                self._names = [c for c in self.table.column_names if c != "input_ids"]
            elif self.directory is not None:
                import pyarrow.dataset as ds

                schema = ds.dataset(str(self.directory), format="parquet", exclude_invalid_files=True).schema
                self._names = [c for c in schema.names if c != "input_ids"]
            else:
                self._names = []
        return self._names

    def read_columns(self, names: Sequence[str]) -> pa.Table:
        """Metadata columns of every cell, in the packed order (never the token column)."""
        if self.table is not None:
            return self.table.select(list(names))
        if self.directory is None:
            return pa.table({n: pa.array([], pa.null()) for n in names})
        from .reader import read_table

        want = list(dict.fromkeys([*names, *IDENTITY]))
        tab = read_table(self.directory, columns=want)
        same = (np.array_equal(tab.column("cell_index").to_numpy(), self.cell_index)
                and np.array_equal(tab.column("file_index").to_numpy(), self.file_index))
        if not same:
            msg = (f"{self.directory}: the Parquet shards and the packed store list cells in different orders; "
                   "re-tokenize with --overwrite")
            raise StoreError(msg)
        return tab.select(list(names))



def from_table(table: pa.Table, name: str) -> CellArrays:
    """The arrays of a token table (``input_ids`` list column + optional identity and ``values`` columns)."""
    if "input_ids" not in table.column_names:
        msg = f"{name}: no 'input_ids' column (has {table.column_names}); pass the output of tokenize_anndata"
        raise InputFileError(msg)
    ids = table.column("input_ids").combine_chunks()
    offsets = ids.offsets.to_numpy().astype(np.int64)
    tokens = ids.values.to_numpy(zero_copy_only=False)[offsets[0]:]
    offsets = offsets - offsets[0]
    n = table.num_rows
    cidx = table.column("cell_index").to_numpy() if "cell_index" in table.column_names else np.arange(n)
    fidx = table.column("file_index").to_numpy() if "file_index" in table.column_names else np.zeros(n, np.int32)
    values = None
    if "values" in table.column_names:
        vcol = table.column("values").combine_chunks()
        values = vcol.values.to_numpy(zero_copy_only=False)[vcol.offsets.to_numpy()[0]:]
    return CellArrays(tokens, offsets, np.asarray(cidx, np.int64), np.asarray(fidx, np.int32), values=values,
                      table=table)


def from_lists(cells: Sequence[Any]) -> CellArrays:
    arrays = [np.asarray(c, dtype=np.int64).reshape(-1) for c in cells]
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([a.size for a in arrays], out=offsets[1:])
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    return CellArrays(tokens, offsets, np.arange(len(arrays), dtype=np.int64), np.zeros(len(arrays), np.int32))


def from_directory(path: Path) -> tuple[CellArrays, dict[str, Any]]:
    """The arrays of a finished token dataset directory and its manifest; the shards, the packed store
    and the manifest must agree on the number of cells."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from .reader import TokenStore, read_manifest, read_table

    man = read_manifest(path)  # refuses a missing or unfinished dataset with what to do
    recorded = man.get("n_cells")
    if man.get("shards"):
        # the manifest's shards only (footers, not tokens): a stray Parquet file is no part of the dataset
        files = [path / s["file"] for s in man["shards"]]
        gone = [f.name for f in files if not f.is_file()]
        if gone:
            msg = (f"{path}: {len(gone)} shard(s) recorded in the manifest are missing ({', '.join(gone[:3])}); "
                   "rerun the same `scfm tokenize ... --resume` to redo them")
            raise StoreError(msg)
        n_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        recorded = sum(int(s.get("n_cells_written", 0)) for s in man["shards"]) if recorded is None else recorded
    else:
        n_rows = ds.dataset(str(path), format="parquet", exclude_invalid_files=True).count_rows()
    if recorded is not None and n_rows != recorded:
        msg = (f"{path}: the Parquet shards hold {n_rows:,} cells but the manifest records {recorded:,}; a shard "
               "is missing or foreign: rerun `scfm tokenize ... --resume` to redo it, or --overwrite")
        raise StoreError(msg)
    if not (path / PACKED_DIR).is_dir():
        # no packed store (a hand-made or older dataset): the shards' tokens are read into memory
        log.warning("%s: no packed token store; reading the Parquet shards' tokens into memory", path)
        tab = read_table(path)
        arrays = from_table(tab, str(path))
        if set(IDENTITY) <= set(tab.column_names):  # metadata then come from the shards, order checked
            arrays.table, arrays.directory = None, path
        else:
            arrays.table = tab.drop_columns(["input_ids"])
        return arrays, man
    store = TokenStore(path)  # checks the packed store against the manifest's count
    if len(store) != n_rows:
        msg = (f"{path}: the packed store holds {len(store):,} cells but the Parquet shards {n_rows:,}; "
               "re-tokenize with --overwrite")
        raise StoreError(msg)
    values = _optional(store, path, "values", VALUES_FILE, store.tokens.shape[0])
    species = _optional(store, path, "species", SPECIES_FILE, len(store))
    return CellArrays(store.tokens, store.offsets, np.asarray(store.cell_index, np.int64),
                      np.asarray(store.file_index, np.int32), values=values, species=species, directory=path), man


def _optional(store: Any, path: Path, attr: str, file: str, n: int) -> np.ndarray | None:
    """An optional packed array: the token store's own when it loads it, else the file if present."""
    arr = getattr(store, attr, None)
    where = path / PACKED_DIR / file
    if arr is None and where.is_file():
        arr = np.load(where, mmap_mode="r")
    if arr is not None and arr.shape[0] != n:
        msg = f"{where}: {arr.shape[0]:,} entries for {n:,} expected; re-tokenize with --overwrite"
        raise StoreError(msg)
    return arr
