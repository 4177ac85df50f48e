"""The one cell-token source: every consumer of tokenized cells (embed, perturb, state embeddings,
training) reads them through :func:`open_cells`.

A source is opened from a token dataset directory (the packed store, memory-mapped), a Parquet file or
``pyarrow.Table`` made by :func:`~scfm_fast.tokenizer.pipeline.tokenize_anndata` (its tokenizer config in
the schema metadata), or an in-memory list of token arrays. All three look the same afterwards: one flat
token array plus offsets, so ``lengths`` never reads a token, ``take`` gathers only the cells asked for,
and :meth:`CellSource.parts` yields views whose tokens are read when taken (memory bounded by the part,
not the corpus). Metadata columns are read only when asked for (``select``, ``columns``).

Examples
--------
>>> cells = open_cells("tokens_dir")                        # doctest: +SKIP
>>> dcm = cells.select(where={"disease": "dcm"})            # doctest: +SKIP
>>> for part in dcm.parts(10_000):                          # doctest: +SKIP
...     ids, cu = part.take_packed(range(len(part)))
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .._errors import InputFileError, StoreError, UsageError
from .schema import PACKED_DIR, table_config

log = logging.getLogger("scfm_fast")

#: optional per-token values (GeneCompass) beside the packed tokens, and the per-cell species column
VALUES_FILE = "values.npy"
SPECIES_COLUMN = "species"
_IDENTITY = ("cell_index", "file_index")


class _Base:
    """Flat tokens + offsets (+ optional per-token values) and where the per-cell metadata lives."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, cell_index: np.ndarray, file_index: np.ndarray,
                 *, values: np.ndarray | None = None, table: pa.Table | None = None,
                 directory: Path | None = None) -> None:
        self.tokens, self.offsets, self.values = tokens, offsets, values
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

        want = list(dict.fromkeys([*names, *_IDENTITY]))
        tab = read_table(self.directory, columns=want)
        same = (np.array_equal(tab.column("cell_index").to_numpy(), self.cell_index)
                and np.array_equal(tab.column("file_index").to_numpy(), self.file_index))
        if not same:
            msg = (f"{self.directory}: the Parquet shards and the packed store list cells in different orders; "
                   "re-tokenize with --overwrite")
            raise StoreError(msg)
        return tab.select(list(names))


class CellSource:
    """Tokenized cells with random access, parts, metadata selection and the tokenizer config.

    Do not build directly: use :func:`open_cells`. A source is an immutable view (``rows`` of a base);
    :meth:`subset`, :meth:`select` and :meth:`parts` return views sharing the same arrays.

    Attributes
    ----------
    name
        What the cells came from, for messages (the directory, "the token table", ...).
    config
        The tokenizer config (``{}`` when unknown, e.g. for plain lists).
    manifest
        The token dataset's manifest (``None`` for tables and lists).
    """

    def __init__(self, base: _Base, rows: np.ndarray | None, *, name: str, config: dict[str, Any],
                 manifest: dict[str, Any] | None = None) -> None:
        self._base, self._rows = base, rows
        self.name, self.config, self.manifest = name, config, manifest

    # ---- size and identity (no token is read) -------------------------------------------------
    def __len__(self) -> int:
        return int(self._base.offsets.shape[0] - 1 if self._rows is None else self._rows.size)

    @property
    def rows(self) -> np.ndarray:
        """Positions of this view's cells in the whole dataset (its packed order)."""
        return np.arange(len(self)) if self._rows is None else self._rows

    def _pick(self, arr: np.ndarray) -> np.ndarray:
        return np.asarray(arr) if self._rows is None else np.asarray(arr)[self._rows]

    @property
    def lengths(self) -> np.ndarray:
        """``int64`` tokens per cell."""
        return self._pick(np.diff(np.asarray(self._base.offsets)).astype(np.int64))

    @property
    def cell_index(self) -> np.ndarray:
        """Row of each cell in its source file (``arange`` for lists)."""
        return self._pick(self._base.cell_index)

    @property
    def file_index(self) -> np.ndarray:
        """Input file of each cell (an index into the manifest's ``inputs``; 0 for tables and lists)."""
        return self._pick(self._base.file_index)

    @property
    def cell_id(self) -> np.ndarray | None:
        """Each cell's obs name, or ``None`` when the source has no ``cell_id`` column."""
        if "cell_id" not in self.column_names:
            return None
        return np.asarray(self.columns(["cell_id"]).column("cell_id").to_pylist(), dtype=object)

    # ---- tokenizer config -------------------------------------------------------------------------
    @property
    def special_token_ids(self) -> tuple[int, ...] | None:
        """Sorted special token ids the tokenizer recorded (``None``: not known from the source)."""
        spec = self.config.get("special_tokens")
        return tuple(sorted({int(v) for v in spec.values()})) if spec else None

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token name -> id, as recorded (``{}`` when unknown)."""
        return {str(k): int(v) for k, v in (self.config.get("special_tokens") or {}).items()}

    @property
    def dictionary_hash(self) -> str | None:
        """sha256 of the token dictionary the cells were tokenized with (``None``: unknown)."""
        return (self.config.get("dictionary_hashes") or {}).get("token_dictionary")

    @property
    def orthologs(self) -> str | None:
        """The ``--orthologs`` the cells were tokenized with (``None``: none or unknown)."""
        orth = self.config.get("orthologs")
        return None if orth in (None, "None") else str(orth)  # manifests store str(None)

    @property
    def preset(self) -> str | None:
        return self.config.get("preset")

    @property
    def max_len(self) -> int | None:
        m = self.config.get("max_len")
        return None if m is None else int(m)

    @property
    def has_values(self) -> bool:
        """Whether the dataset carries per-token values (GeneCompass inputs)."""
        return self._base.values is not None

    @property
    def species(self) -> np.ndarray | None:
        """Each cell's species when the dataset has a ``species`` column, else ``None``."""
        if SPECIES_COLUMN not in self.column_names:
            return None
        return np.asarray(self.columns([SPECIES_COLUMN]).column(SPECIES_COLUMN).to_pylist(), dtype=object)

    # ---- tokens ------------------------------------------------------------------------------------
    def _base_rows(self, indices: Any) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            bad = int(idx[(idx < -n) | (idx >= n)][0])
            msg = f"{self.name}: cell {bad} out of range for {n} cells"
            raise IndexError(msg)
        idx = idx % max(n, 1)
        return idx if self._rows is None else self._rows[idx]

    def _gather(self, flat: np.ndarray, indices: Any, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
        rows = self._base_rows(indices)
        offs = self._base.offsets
        starts = np.asarray(offs[rows], dtype=np.int64)
        lens = np.asarray(offs[rows + 1], dtype=np.int64) - starts
        cu = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(lens, out=cu[1:])
        # one gather for the whole batch: a memory map reads only the pages these cells occupy
        where = np.repeat(starts - cu[:-1], lens) + np.arange(int(cu[-1]), dtype=np.int64)
        return np.asarray(flat[where], dtype=dtype), cu

    def take_packed(self, indices: Any) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of the cells at ``indices`` (positions in this view), concatenated.

        Returns
        -------
        input_ids
            ``int64`` tokens of the cells, in the order asked.
        cu_seqlens
            ``int32`` offsets: cell ``k`` is ``input_ids[cu_seqlens[k]:cu_seqlens[k + 1]]``.
        """
        ids, cu = self._gather(self._base.tokens, indices, np.int64)
        return ids, cu.astype(np.int32)

    def take(self, indices: Any) -> list[np.ndarray]:
        """Token arrays (``int64``) of the cells at ``indices`` (positions in this view)."""
        ids, cu = self._gather(self._base.tokens, indices, np.int64)
        return [ids[cu[k]:cu[k + 1]] for k in range(cu.size - 1)]

    def take_values(self, indices: Any) -> list[np.ndarray]:
        """Per-token values (``float32``) of the cells at ``indices``; refused when the dataset has none."""
        if self._base.values is None:
            msg = f"{self.name}: has no per-token values ({PACKED_DIR}/{VALUES_FILE}); tokenize with values"
            raise StoreError(msg)
        vals, cu = self._gather(self._base.values, indices, np.float32)
        return [vals[cu[k]:cu[k + 1]] for k in range(cu.size - 1)]

    def first_token_outside(self, vocab_size: int, *, block: int = 1 << 24) -> tuple[int, int] | None:
        """``(position, token)`` of the first cell holding a token id outside ``[0, vocab_size)``, else ``None``.

        Scans the tokens in blocks (a corpus is never loaded whole); what a model check runs before its
        first part, so a bad id is an error naming the cell instead of an IndexError mid-run.
        """
        if self._rows is None:
            flat, offs = self._base.tokens, np.asarray(self._base.offsets)
            for s in range(0, int(flat.shape[0]), block):
                chunk = np.asarray(flat[s:s + block])
                bad = np.flatnonzero((chunk < 0) | (chunk >= vocab_size)) if chunk.size else chunk
                if bad.size:
                    at = s + int(bad[0])
                    return int(np.searchsorted(offs, at, side="right") - 1), int(chunk[bad[0]])
            return None
        for part_start, part in zip(range(0, len(self), 65_536), self.parts(65_536)):
            ids, cu = part.take_packed(np.arange(len(part)))
            bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
            if bad.size:
                return part_start + int(np.searchsorted(cu, bad[0], side="right") - 1), int(ids[bad[0]])
        return None

    def __getitem__(self, i: int) -> np.ndarray:
        return self.take([i])[0]

    def iter_cells(self, *, part_size: int = 10_000) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(cell_index, input_ids)`` cell by cell, reading tokens part by part."""
        for part in self.parts(part_size):
            for ci, toks in zip(part.cell_index.tolist(), part.take(np.arange(len(part)))):
                yield int(ci), toks

    # ---- views -------------------------------------------------------------------------------------
    def subset(self, positions: Any) -> CellSource:
        """A view of the cells at ``positions`` (in this view), in that order."""
        return CellSource(self._base, self._base_rows(positions), name=self.name, config=self.config,
                          manifest=self.manifest)

    def parts(self, size: int) -> Iterator[CellSource]:
        """Consecutive views of at most ``size`` cells; tokens are read only when a part takes them."""
        if size < 1:
            msg = f"part size {size}: must be at least 1"
            raise UsageError(msg)
        for s in range(0, len(self), size):
            yield self.subset(np.arange(s, min(len(self), s + size)))

    @property
    def column_names(self) -> list[str]:
        """Per-cell metadata columns (everything but the tokens)."""
        return self._base.column_names()

    def columns(self, names: Sequence[str]) -> pa.Table:
        """The metadata ``names`` of this view's cells, in its order (reads only those columns)."""
        missing = [c for c in names if c not in self.column_names]
        if missing:
            msg = (f"{self.name}: no metadata column {missing[0]!r} (have {self.column_names}); tokenize with "
                   f"--obs-columns {missing[0]}")
            raise InputFileError(msg)
        tab = self._base.read_columns(names)
        return tab if self._rows is None else tab.take(pa.array(self._rows))

    def select(self, *, where: Mapping[str, Any]) -> CellSource:
        """The cells whose metadata match ``where`` (column -> value, or a list of accepted values).

        Values compare as strings, so ``{"disease": "dcm"}`` matches a categorical, string or
        dictionary column alike. An empty selection is refused naming the column and the values seen.
        """
        if not where:
            return self
        tab = self.columns(list(where))
        keep = np.ones(len(self), dtype=bool)
        for col, want in where.items():
            accepted = {str(v) for v in (want if isinstance(want, (list, tuple, set)) else [want])}
            vals = np.asarray([str(v) for v in tab.column(col).to_pylist()], dtype=object)
            hit = np.isin(vals, list(accepted))
            if not hit.any():
                seen = sorted(set(vals.tolist()))
                msg = (f"{self.name}: no cell has {col} in {sorted(accepted)} (values seen: {seen[:10]}"
                       f"{' ...' if len(seen) > 10 else ''})")
                raise UsageError(msg)
            keep &= hit
        if not keep.any():
            msg = f"{self.name}: no cell matches all of {dict(where)}"
            raise UsageError(msg)
        return self.subset(np.flatnonzero(keep))


# ---- opening -------------------------------------------------------------------------------------------
def _from_table(table: pa.Table, name: str, config: dict[str, Any] | None) -> CellSource:
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
    base = _Base(tokens, offsets, np.asarray(cidx, np.int64), np.asarray(fidx, np.int32), values=values,
                 table=table)
    return CellSource(base, None, name=name, config=config if config is not None else table_config(table))


def _from_lists(cells: Sequence[Any], config: dict[str, Any] | None) -> CellSource:
    arrays = [np.asarray(c, dtype=np.int64).reshape(-1) for c in cells]
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([a.size for a in arrays], out=offsets[1:])
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    base = _Base(tokens, offsets, np.arange(len(arrays), dtype=np.int64), np.zeros(len(arrays), np.int32))
    return CellSource(base, None, name="the token list", config=dict(config or {}))


def _from_directory(path: Path, *, allow_empty: bool) -> CellSource:
    import pyarrow.dataset as ds

    from .reader import TokenStore, read_manifest, read_table

    man = read_manifest(path)  # refuses a missing or unfinished dataset with what to do
    config = man.get("config", {})
    n_rows = ds.dataset(str(path), format="parquet", exclude_invalid_files=True).count_rows()
    recorded = man.get("n_cells")
    if recorded is None and man.get("shards"):
        recorded = sum(int(s.get("n_cells_written", 0)) for s in man["shards"])
    if recorded is not None and n_rows != recorded:
        msg = (f"{path}: the Parquet shards hold {n_rows:,} cells but the manifest records {recorded:,}; a shard "
               "is missing or foreign: rerun `scfm tokenize ... --resume` to redo it, or --overwrite")
        raise StoreError(msg)
    if (path / PACKED_DIR).is_dir():
        store = TokenStore(path)  # checks the packed store against the manifest's count
        if len(store) != n_rows:
            msg = (f"{path}: the packed store holds {len(store):,} cells but the Parquet shards {n_rows:,}; "
                   "re-tokenize with --overwrite")
            raise StoreError(msg)
        vpath = path / PACKED_DIR / VALUES_FILE
        values = np.load(vpath, mmap_mode="r") if vpath.is_file() else None
        if values is not None and values.shape[0] != store.tokens.shape[0]:
            msg = f"{vpath}: {values.shape[0]:,} values for {store.tokens.shape[0]:,} tokens; re-tokenize"
            raise StoreError(msg)
        base = _Base(store.tokens, store.offsets, np.asarray(store.cell_index, np.int64),
                     np.asarray(store.file_index, np.int32), values=values, directory=path)
        src = CellSource(base, None, name=str(path), config=config, manifest=man)
    else:
        # no packed store (a hand-made or older dataset): the shards' tokens are read into memory
        log.warning("%s: no packed token store; reading the Parquet shards' tokens into memory", path)
        tab = read_table(path)
        src = _from_table(tab, str(path), config)
        src.manifest = man
        src._base.table, src._base.directory = None, path
        if not set(_IDENTITY) <= set(tab.column_names):
            src._base.table = tab.drop_columns(["input_ids"])  # order cannot be checked: use these rows
    if len(src) == 0 and not allow_empty:
        msg = (f"{path}: the token dataset holds no cells (every cell was filtered out or had no vocabulary "
               "gene); check the tokenize inputs and options and tokenize again")
        raise StoreError(msg)
    return src


def open_cells(tokens: Any, *, config: dict[str, Any] | None = None, allow_empty: bool = False) -> CellSource:
    """Open tokenized cells from any of the forms scfm_fast produces.

    Parameters
    ----------
    tokens
        A token dataset directory (``scfm tokenize``), a Parquet file or ``pyarrow.Table`` from
        :func:`~scfm_fast.tokenizer.pipeline.tokenize_anndata`, a list of token arrays, or a
        :class:`CellSource` (returned as is).
    config
        Tokenizer config for a list (or to override a table's); a directory's comes from its manifest.
    allow_empty
        Accept a dataset or table without cells (refused by default: a run over it would "succeed"
        with nothing).

    Returns
    -------
    CellSource

    Raises
    ------
    StoreError
        A directory that is not a finished token dataset, whose shards, packed store and manifest
        disagree on the number of cells, or (unless ``allow_empty``) that holds no cells.
    InputFileError
        A missing path, or a table without ``input_ids``.
    """
    if isinstance(tokens, CellSource):
        return tokens
    if isinstance(tokens, (str, Path)):
        p = Path(tokens)
        if p.is_dir():
            return _from_directory(p, allow_empty=allow_empty)
        if not p.is_file():
            msg = f"{p}: token dataset not found; pass the --out directory of `scfm tokenize`"
            raise InputFileError(msg)
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except (OSError, pa.ArrowException) as e:
            msg = f"{p}: not a readable Parquet token table ({e})"
            raise InputFileError(msg) from None
        src = _from_table(table, str(p), config)
    elif isinstance(tokens, pa.Table):
        src = _from_table(tokens, "the token table", config)
    elif isinstance(tokens, np.ndarray) and tokens.ndim == 2:
        src = _from_lists(list(tokens), config)
    else:
        src = _from_lists(list(tokens), config)
    if len(src) == 0 and not allow_empty and not isinstance(tokens, (list, tuple, np.ndarray)):
        msg = f"{src.name}: holds no cells; tokenize cells with at least one vocabulary gene"
        raise StoreError(msg)
    return src
