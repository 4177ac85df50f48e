"""Input decisions of a tokenization run: which cells pass ``filter_pass``, which var column holds the
gene ids (``var["ensembl_id"]`` by default when present; a default beaten clearly by another column stops
the run), and which input files a ``--shard K/N`` job takes."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from .._errors import InputFileError, UsageError
from ..readers.obs import Masked, column_to_float, is_missing
from ..vocab import resolve_genes

FILTER_COLUMN = "filter_pass"
#: var column read for gene ids when ``--gene-id-column`` is not given (Geneformer's convention)
ENSEMBL_ID_COLUMN = "ensembl_id"

_FILTER_WORDS = {"true": True, "false": False, "1": True, "0": False}


def filter_mask(path: str, chunk) -> np.ndarray:
    """Which cells of a chunk pass: ``filter_pass`` as bool, 0/1 or the strings "True"/"False" (also as
    categories); any other value is refused, so a misread column never drops every cell silently."""
    meta = chunk.meta
    if FILTER_COLUMN not in meta:
        return np.ones(chunk.n_cells, dtype=bool)
    col = meta[FILTER_COLUMN]
    if isinstance(col, Masked) and col.kind == "boolean" and not col.mask.any():
        col = col.values
    if isinstance(col, np.ndarray) and col.dtype.kind == "b":
        return col.astype(bool, copy=False)
    seen = np.asarray(col, dtype=object)
    if (isinstance(col, np.ndarray) and col.dtype.kind in "iuf") or (
            isinstance(col, Masked) and col.kind in ("integer", "float")):
        values = column_to_float(col)
        if np.isin(values, (0.0, 1.0)).all():
            return values == 1
    else:  # text, categories, Python objects: the words True/False/1/0 (any case), or Python bools
        words = [_FILTER_WORDS.get(str(v).strip().lower()) if isinstance(v, (str, bool, np.bool_)) else None
                 for v in seen]
        if None not in words:
            return np.array(words, dtype=bool)
    shown = sorted({repr(v.item() if isinstance(v, np.generic) else v) for v in _first_unique(seen, 20)})
    msg = (f"{path}: obs column {FILTER_COLUMN!r} (rows {chunk.start}..{chunk.stop - 1}) holds values "
           f"{', '.join(shown[:10])}; it must be boolean, 0/1 or 'True'/'False' (1/True = keep the cell). "
           f"Fix the column (or drop it to keep every cell)")
    raise InputFileError(msg)


def _first_unique(values: np.ndarray, n: int) -> list:
    """The first ``n`` distinct values in order of appearance (missing values count as one)."""
    out: dict = {}
    for v in values:
        key = None if is_missing(v) else v
        if key not in out:
            out[key] = v
            if len(out) == n:
                break
    return list(out.values())


def _var_candidates(r, in_use: np.ndarray) -> dict[str, np.ndarray]:
    """The reader's other text var columns (and its var index), as gene-id alternatives to ``in_use``."""
    from ..readers._common import VAR_INDEX

    found = {}
    for c in r.var_columns:
        try:
            values = r.read_var_values(c).astype(object)
        except InputFileError:
            continue  # a column in an encoding we cannot read is no gene-id candidate, and no reason to stop
        if values.size and isinstance(values[0], str):
            found[c] = values.astype(str)
    if hasattr(r, "read_var_index") and VAR_INDEX not in found:
        found[VAR_INDEX] = r.read_var_index()
    return {c: v for c, v in found.items() if not np.array_equal(v, in_use)}


def gene_ids_of(reader: Any, gene_id_column: str | None) -> tuple[np.ndarray, str]:
    """Gene ids of a reader's gene axis and where they came from, for the match report.

    Without ``gene_id_column`` the ids are ``var["ensembl_id"]`` when that column exists (Geneformer's
    convention), else the reader's default (the var index; for loom its gene-id row attribute).
    """
    from ..readers._common import VAR_INDEX

    if gene_id_column == VAR_INDEX:
        return reader.var_names, "var index (--gene-id-column index)"
    if gene_id_column is not None:
        return reader.var_names, f"var[{gene_id_column!r}] (--gene-id-column)"
    if ENSEMBL_ID_COLUMN in reader.var_columns:
        values = reader.read_var_values(ENSEMBL_ID_COLUMN).astype(object)
        return np.asarray([str(v) for v in values], dtype=str), f"var[{ENSEMBL_ID_COLUMN!r}]"
    return reader.var_names, "var index"


def resolve_input(path: str, r, spec, *, gene_id_column: str | None,
                  allow_case_insensitive: bool) -> tuple[np.ndarray, Any, np.ndarray]:
    """Gene ids -> tokens for one input, its match report (with the id source) and the ids; a default
    id source that another var column beats stops here (not with Geneformer's gene mapping file, whose
    ids are ``var["ensembl_id"]`` by definition)."""
    from ..vocab.gene_ids import check_gene_id_choice

    ids, id_source = gene_ids_of(r, gene_id_column)
    kw = {"gene_name_map": spec.gene_name_map, "ortholog_map": spec.ortholog_map}
    if gene_id_column is None and spec.gene_mapping is None:
        _, first = resolve_genes(ids, spec.vocab, **kw, min_fraction=0.0, source=path,
                                 allow_case_insensitive=True)
        check_gene_id_choice(first, _var_candidates(r, ids), spec.vocab, **kw, source=path,
                             current_name="the default gene ids")
    col_token, report = resolve_genes(ids, spec.vocab, **kw, gene_mapping=spec.gene_mapping,
                                      min_fraction=spec.min_gene_match, source=path,
                                      allow_case_insensitive=allow_case_insensitive)
    report.id_source = id_source
    return col_token, report, ids


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
