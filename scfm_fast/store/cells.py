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

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .._errors import InputFileError, StoreError, UsageError
from ._cell_arrays import SPECIES_COLUMN, CellArrays, from_directory, from_lists, from_table
from .schema import PACKED_DIR, table_config
from .segments import SegmentedArray


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

    def __init__(self, base: CellArrays, rows: np.ndarray | None, *, name: str, config: dict[str, Any],
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
        offs = self._base.offsets
        if self._rows is None:
            return np.diff(np.asarray(offs)).astype(np.int64)
        return (np.asarray(offs[self._rows + 1]) - np.asarray(offs[self._rows])).astype(np.int64)

    @property
    def cell_index(self) -> np.ndarray:
        """Row of each cell in its source file (``arange`` for lists)."""
        return self._pick(self._base.cell_index)

    @property
    def file_index(self) -> np.ndarray:
        """Input file of each cell (an index into the manifest's ``inputs``; 0 for tables and lists)."""
        return self._pick(self._base.file_index)

    def _values_of(self, name: str) -> np.ndarray | None:
        if name not in self.column_names:
            return None
        return np.asarray(self.columns([name]).column(name).to_pylist(), dtype=object)

    @property
    def cell_id(self) -> np.ndarray | None:
        """Each cell's obs name, or ``None`` when the source has no ``cell_id`` column."""
        return self._values_of("cell_id")

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
        """Each cell's species (GeneCompass: 0 human, 1 mouse) when the dataset records it, else ``None``."""
        if self._base.species is not None:
            return self._pick(self._base.species)
        return self._values_of(SPECIES_COLUMN)

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
        if isinstance(flat, SegmentedArray):  # per-shard segments: one slice per cell
            return flat.take_ranges(starts, lens, dtype), cu
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
            msg = f"{self.name}: has no per-token values (no {PACKED_DIR}/values); tokenize with values"
            raise StoreError(msg)
        vals, cu = self._gather(self._base.values, indices, np.float32)
        return [vals[cu[k]:cu[k + 1]] for k in range(cu.size - 1)]

    def first_token_outside(self, vocab_size: int, *, block: int = 1 << 22) -> tuple[int, int] | None:
        """``(position, token)`` of the first cell holding a token id outside ``[0, vocab_size)``, else ``None``.

        Reads about ``block`` tokens at a time (a corpus is never loaded whole): what a model check runs
        before its first part, so a bad id is an error naming the cell, not an IndexError mid-run.
        """
        if self._rows is None:  # the whole dataset: scan the flat tokens in place
            flat, offs = self._base.tokens, np.asarray(self._base.offsets)
            for s in range(0, int(flat.shape[0]), block):
                chunk = np.asarray(flat[s:s + block])
                bad = np.flatnonzero((chunk < 0) | (chunk >= vocab_size))
                if bad.size:
                    return int(np.searchsorted(offs, s + bad[0], side="right") - 1), int(chunk[bad[0]])
            return None
        cells = max(1, block // max(1, int(self.lengths.max(initial=1))))
        for start, part in zip(range(0, len(self), cells), self.parts(cells)):
            ids, cu = part.take_packed(np.arange(len(part)))
            bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
            if bad.size:
                return start + int(np.searchsorted(cu, bad[0], side="right") - 1), int(ids[bad[0]])
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
    manifest = None
    if isinstance(tokens, (str, Path)) and Path(tokens).is_dir():
        arrays, manifest = from_directory(Path(tokens))
        name, cfg = str(tokens), manifest.get("config", {})
    elif isinstance(tokens, (str, Path, pa.Table)):
        table, name = tokens, "the token table"
        if not isinstance(tokens, pa.Table):
            table, name = _read_parquet(Path(tokens)), str(tokens)
        arrays, cfg = from_table(table, name), table_config(table)
    else:
        arrays, name, cfg = from_lists(list(tokens)), "the token list", {}
    src = CellSource(arrays, None, name=name, config=cfg if config is None else dict(config), manifest=manifest)
    if len(src) == 0 and not allow_empty and name != "the token list":
        msg = (f"{name}: the token dataset holds no cells (every cell was filtered out or had no vocabulary gene); "
               "check the tokenize inputs and options and tokenize again")
        raise StoreError(msg)
    return src


def _read_parquet(p: Path) -> pa.Table:
    import pyarrow.parquet as pq

    if not p.is_file():
        msg = f"{p}: token dataset not found; pass the --out directory of `scfm tokenize`"
        raise InputFileError(msg)
    try:
        return pq.read_table(p)
    except (OSError, pa.ArrowException) as e:
        msg = f"{p}: not a readable Parquet token table ({e})"
        raise InputFileError(msg) from None
