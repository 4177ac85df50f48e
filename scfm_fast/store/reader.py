"""Read a token dataset directory: Arrow/Parquet tables, memory-mapped packed tokens, HF datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .._errors import StoreError
from .packed import OPTIONAL_PACKED
from .schema import MANIFEST, PACKED_DIR, SEGMENTS
from .segments import SegmentedArray, open_segments

#: what an error about a missing or damaged packed array tells the user to do
_REPAIR = "rebuild it with the same `scfm tokenize ... --resume` after deleting __scfm__/packed"


def read_manifest(path: str | Path, *, require_complete: bool = True) -> dict[str, Any]:
    """The manifest of a token dataset; raises :class:`StoreError` if it is unfinished."""
    p = Path(path) / MANIFEST
    if not p.exists():
        msg = f"{path}: no {MANIFEST}: not an scfm_fast token dataset (run `scfm tokenize` first)"
        raise StoreError(msg)
    try:
        man = json.loads(p.read_text())
    except ValueError:
        man = None
    if not isinstance(man, dict):
        msg = (f"{p}: the manifest is damaged (truncated or not JSON); rerun the same `scfm tokenize` with "
               "--overwrite to rebuild the dataset")
        raise StoreError(msg)
    if require_complete and man.get("status") != "complete":
        msg = (f"{path}: token dataset is unfinished (status {man.get('status')!r}); rerun the same "
               "`scfm tokenize ... --resume` to complete it")
        raise StoreError(msg)
    return man


def _shard_files(path: str | Path, man: dict[str, Any]) -> list[Path]:
    """The manifest's shard files in source order; every one must exist.

    A manifest with no shard records at all (a dataset assembled by hand, not by ``scfm tokenize``) means
    every ``part-*.parquet`` file of the directory.
    """
    if "shards" not in man:
        return sorted(Path(path).glob("part-*.parquet"))
    files = [Path(path) / s["file"] for s in sorted(man["shards"], key=lambda s: (s["file_index"], s["start"]))]
    gone = [f.name for f in files if not f.is_file()]
    if gone:
        msg = (f"{path}: {len(gone)} shard(s) recorded in the manifest are missing ({', '.join(gone[:3])}); "
               "rerun the same `scfm tokenize ... --resume` to redo them")
        raise StoreError(msg)
    return files


def read_table(path: str | Path, *, columns: list[str] | None = None) -> pa.Table:
    """All shards as one Arrow table, in source order (file, then row).

    Parameters
    ----------
    path
        A complete token dataset directory.
    columns
        Columns to read (default: all).
    """
    man = read_manifest(path)
    files = _shard_files(path, man)
    # the manifest's shards only: a stray Parquet file in the directory is not part of the dataset
    import pyarrow.dataset as ds  # on first use: it imports pandas, which the tokenize path never needs

    tab = ds.dataset([str(f) for f in files], format="parquet").to_table(columns=columns)
    if tab.num_rows != man.get("n_cells", tab.num_rows):
        msg = (f"{path}: the shards hold {tab.num_rows:,} cells but the manifest records {man['n_cells']:,}; "
               "the dataset is damaged: re-tokenize with --overwrite")
        raise StoreError(msg)
    if "file_index" in tab.column_names and "cell_index" in tab.column_names:
        tab = tab.sort_by([("file_index", "ascending"), ("cell_index", "ascending")])
    return tab


class TokenStore:
    """Memory-mapped random access to a token dataset's packed tokens.

    Parameters
    ----------
    path
        A complete token dataset directory.

    Examples
    --------
    >>> store = TokenStore(out_dir)  # doctest: +SKIP
    >>> store[0][:5], len(store), store.lengths.mean()  # doctest: +SKIP
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        d = self.path / PACKED_DIR
        packed = self.manifest.get("packed") or {}
        try:
            if not d.is_dir():
                msg = f"no folder {d}"
                raise FileNotFoundError(msg)
            if packed.get("layout") == SEGMENTS:
                self.tokens = open_segments(d, "tokens", self.manifest["shards"], packed["dtype"], repair=_REPAIR)
            else:  # one tokens.npy (format scfm_fast.tokens/1)
                self.tokens = np.load(d / "tokens.npy", mmap_mode="r")
            self.offsets = np.load(d / "offsets.npy", mmap_mode="r")
            self.cell_index = np.load(d / "cell_index.npy", mmap_mode="r")
            self.file_index = np.load(d / "file_index.npy", mmap_mode="r")
        except (OSError, ValueError) as e:
            msg = (f"{self.path}: the packed token store is missing or damaged ({e}); the Parquet shards are "
                   "intact: rebuild it with the same `scfm tokenize ... --resume`, or read the shards "
                   "with read_table()")
            raise StoreError(msg) from None
        # GeneCompass datasets: float32 values aligned with tokens, int8 species per cell (else None)
        self.values = self._optional(d, "values", self.tokens.shape[0])
        self.species = self._optional(d, "species", self.offsets.shape[0] - 1)
        n_cells, n_tokens = self.manifest.get("n_cells"), self.manifest.get("n_tokens")
        if (n_cells is not None and self.offsets.shape[0] != n_cells + 1) or (
                n_tokens is not None and (self.tokens.shape[0] != n_tokens or int(self.offsets[-1]) != n_tokens)):
            msg = (f"{self.path}: the packed store holds {self.offsets.shape[0] - 1:,} cells / "
                   f"{self.tokens.shape[0]:,} tokens but the manifest records {n_cells:,} / {n_tokens:,}; "
                   "rebuild it with the same `scfm tokenize ... --resume` after deleting __scfm__/packed")
            raise StoreError(msg)

    def _optional(self, d: Path, name: str, n: int) -> np.ndarray | SegmentedArray | None:
        packed = self.manifest.get("packed") or {}
        if name not in (packed.get("optional") or []):
            return None
        if packed.get("layout") == SEGMENTS and OPTIONAL_PACKED[name][0] == "token":
            return open_segments(d, name, self.manifest["shards"], OPTIONAL_PACKED[name][1], repair=_REPAIR)
        try:
            arr = np.load(d / f"{name}.npy", mmap_mode="r")
        except (OSError, ValueError) as e:
            msg = f"{self.path}: packed {name}.npy is missing or damaged ({e}); {_REPAIR}"
            raise StoreError(msg) from None
        if arr.shape[0] != n:
            msg = f"{self.path}: packed {name}.npy has {arr.shape[0]:,} entries, expected {n:,}; {_REPAIR}"
            raise StoreError(msg)
        return arr

    def cell_values(self, i: int) -> np.ndarray:
        """float32 GeneCompass values of cell ``i``, aligned with ``self[i]``."""
        if self.values is None:
            msg = f"{self.path}: this token dataset has no values (tokenize with --preset genecompass)"
            raise StoreError(msg)
        self[i]  # range check
        i %= len(self)
        return np.asarray(self.values[self.offsets[i]:self.offsets[i + 1]], dtype=np.float32)

    def __len__(self) -> int:
        return int(self.offsets.shape[0] - 1)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            msg = f"cell {i} out of range for a store of {len(self)} cells"
            raise IndexError(msg)
        i %= len(self)
        return np.asarray(self.tokens[self.offsets[i]:self.offsets[i + 1]], dtype=np.int32)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(np.asarray(self.offsets))


def to_hf_dataset(path: str | Path):
    """The shards as a Hugging Face ``datasets.Dataset`` (needs ``datasets``).

    Parameters
    ----------
    path
        A complete token dataset directory; equivalent to
        ``datasets.load_dataset("parquet", data_dir=path, split="train")``.
    """
    import datasets

    files = [str(f) for f in _shard_files(path, read_manifest(path))]
    return datasets.load_dataset("parquet", data_files=files, split="train")
