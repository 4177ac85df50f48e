"""Per-input decisions of a tokenization run: where gene ids come from, which files a shard takes."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from .._errors import UsageError

#: var column read for gene ids when ``--gene-id-column`` is not given (Geneformer's convention)
ENSEMBL_ID_COLUMN = "ensembl_id"


def gene_ids_of(reader: Any, gene_id_column: str | None) -> tuple[np.ndarray, str]:
    """Gene ids of a reader's gene axis and where they came from, for the match report.

    Without ``gene_id_column`` the ids are ``var["ensembl_id"]`` when that column exists (Geneformer's
    convention), else the reader's default (the var index; for loom its gene-id row attribute).
    """
    if gene_id_column is not None:
        return reader.var_names, f"var[{gene_id_column!r}] (--gene-id-column)"
    if ENSEMBL_ID_COLUMN in reader.var_columns:
        values = np.asarray(reader.read_var_column(ENSEMBL_ID_COLUMN), dtype=object)
        return np.asarray([str(v) for v in values], dtype=str), f"var[{ENSEMBL_ID_COLUMN!r}]"
    return reader.var_names, "var index"


_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """``"K/N"`` -> ``(K, N)`` with ``1 <= K <= N``; ``None`` stays ``None``."""
    if shard is None:
        return None
    m = _SHARD.match(str(shard))
    if m is None or not 1 <= int(m.group(1)) <= int(m.group(2)):
        msg = f"--shard {shard!r}: expected K/N with 1 <= K <= N (e.g. --shard 3/16 for the 3rd of 16 jobs)"
        raise UsageError(msg)
    return int(m.group(1)), int(m.group(2))


def shard_files(n_inputs: int, shard: tuple[int, int] | None) -> list[int]:
    """Indexes of the inputs shard ``(K, N)`` takes: every N-th file, starting with the K-th."""
    if shard is None:
        return list(range(n_inputs))
    k, n = shard
    return list(range(k - 1, n_inputs, n))
