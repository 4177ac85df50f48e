"""Export a GeneCompass token dataset to GeneCompass's own dataset layout (for users of its scripts).

GeneCompass reads a Hugging Face ``datasets`` folder (``Dataset.save_to_disk``) with, per cell,
``input_ids`` (int32 x 2,048) and ``values`` (float32 x 2,048), both padded with 0 after the cell's
genes, and ``length`` and ``species`` as one-element lists.  Our store stays unpadded; this writes
the padded copy.  The folder is written under a temporary name and renamed into place, so a crash
never leaves a folder that looks complete.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import StoreError
from .reader import TokenStore

GENECOMPASS_LEN = 2048


def _features(max_len: int):
    import datasets

    return datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32"), length=max_len),
        "values": datasets.Sequence(datasets.Value("float32"), length=max_len),
        "length": datasets.Sequence(datasets.Value("int64"), length=1),
        "species": datasets.Sequence(datasets.Value("int64"), length=1),
    })


def _padded_rows(path: str, max_len: int, batch: int) -> Iterator[dict[str, Any]]:
    """One padded row per cell, read from the packed store batch by batch (bounded memory)."""
    store = TokenStore(path)
    for lo in range(0, len(store), batch):
        hi = min(lo + batch, len(store))
        off = np.asarray(store.offsets[lo:hi + 1])
        tokens = np.asarray(store.tokens[off[0]:off[-1]], dtype=np.int32)
        values = np.asarray(store.values[off[0]:off[-1]], dtype=np.float32)
        for j in range(hi - lo):
            a, b = off[j] - off[0], off[j + 1] - off[0]
            ids = np.zeros(max_len, dtype=np.int32)
            vals = np.zeros(max_len, dtype=np.float32)
            ids[:b - a], vals[:b - a] = tokens[a:b], values[a:b]
            yield {"input_ids": ids, "values": vals, "length": [int(b - a)], "species": [int(store.species[lo + j])]}


def export_genecompass(path: str | Path, out: str | Path, *, max_len: int = GENECOMPASS_LEN,
                       overwrite: bool = False, batch_size: int = 10_000) -> Path:
    """Write a token dataset tokenized with ``--preset genecompass`` in GeneCompass's layout.

    Parameters
    ----------
    path
        A complete token dataset directory with values and species.
    out
        The ``datasets`` folder to write (``datasets.load_from_disk(out)`` reads it).
    max_len
        Padded length (GeneCompass: 2,048); cells longer than it are refused, not cut.
    overwrite
        Replace an existing ``out``.
    batch_size
        Cells read from the packed store at a time.

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    StoreError
        When the dataset has no values/species, a cell is longer than ``max_len``, or ``out`` exists.
    """
    import datasets

    store = TokenStore(path)
    if store.values is None or store.species is None:
        msg = f"{path}: has no values/species; tokenize with --preset genecompass --species ... to export it"
        raise StoreError(msg)
    longest = int(store.lengths.max()) if len(store) else 0
    if longest > max_len:
        msg = (f"{path}: a cell has {longest} tokens, more than max_len={max_len}; tokenize with "
               f"--max-len {max_len} or pass a larger max_len")
        raise StoreError(msg)
    out = Path(out)
    if out.exists() and not overwrite:
        msg = f"{out}: already exists; pass overwrite=True to replace it"
        raise StoreError(msg)
    tmp = out.with_name(out.name + ".tmp")
    cache = out.with_name(out.name + ".cache.tmp")
    for d in (tmp, cache):
        shutil.rmtree(d, ignore_errors=True)
    try:
        dset = datasets.Dataset.from_generator(
            _padded_rows, features=_features(max_len), cache_dir=str(cache),
            gen_kwargs={"path": str(path), "max_len": max_len, "batch": batch_size})
        dset.save_to_disk(str(tmp))
        del dset
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    return out
