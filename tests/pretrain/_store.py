"""Tiny token datasets for pretraining tests, written with the real store writer."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa

from scfm_fast.store import ShardedTokenWriter
from scfm_fast.vocab.dictionaries import file_sha256

SPECIALS = {"<pad>": 0, "<mask>": 1}


def write_dictionary(path: Path, vocab_size: int, specials=SPECIALS) -> Path:
    d = dict(specials)
    d.update({f"G{i:05d}": i for i in range(len(specials), vocab_size)})
    path.write_bytes(pickle.dumps(d))
    return path


def write_store(out: Path, cells: list[np.ndarray], *, dictionary: Path, specials=SPECIALS,
                vocab_size: int = 1 << 15) -> Path:
    """A complete token dataset holding ``cells`` (one shard)."""
    cfg = {"preset": "custom", "special_tokens": specials,
           "dictionary_hashes": {"token_dictionary": file_sha256(dictionary)}}
    w = ShardedTokenWriter(out, config=cfg, vocab_size=vocab_size)
    n = len(cells)
    tab = pa.table({
        "input_ids": pa.array([np.asarray(c, np.int32) for c in cells], type=pa.list_(pa.int32())),
        "length": pa.array(np.array([len(c) for c in cells], dtype=np.int32)),
        "cell_index": pa.array(np.arange(n, dtype=np.int64)),
        "file_index": pa.array(np.zeros(n, dtype=np.int32)),
        "cell_id": pa.array([f"c{i}" for i in range(n)]),
    })
    w.write_shard(tab, file_index=0, start=0, stop=n, stats={"n_tokens": int(sum(len(c) for c in cells))})
    w.finalize()
    return out


def random_cells(n: int, *, vocab_size: int, lo: int = 3, hi: int = 40, seed: int = 0,
                 n_special: int = 2) -> list[np.ndarray]:
    """Cells of distinct gene tokens with a learnable structure (genes drawn from a skewed distribution)."""
    rng = np.random.default_rng(seed)
    genes = np.arange(n_special, vocab_size)
    p = 1.0 / np.arange(1, genes.size + 1)
    p /= p.sum()
    return [rng.choice(genes, size=int(rng.integers(lo, hi + 1)), replace=False, p=p) for _ in range(n)]
