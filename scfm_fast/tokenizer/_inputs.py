"""Input decisions of a tokenization run: which cells pass ``filter_pass`` and which var column holds the
gene ids (a default beaten clearly by another column stops the run)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .._errors import InputFileError
from ..vocab import resolve_genes

FILTER_COLUMN = "filter_pass"

_FILTER_WORDS = {"true": True, "false": False, "1": True, "0": False}


def filter_mask(path: str, chunk) -> np.ndarray:
    """Which cells of a chunk pass: ``filter_pass`` as bool, 0/1 or the strings "True"/"False" (also as
    categories); any other value is refused, so a misread column never drops every cell silently."""
    if FILTER_COLUMN not in chunk.obs.columns:
        return np.ones(chunk.n_cells, dtype=bool)
    col = chunk.obs[FILTER_COLUMN]
    if isinstance(col.dtype, pd.CategoricalDtype):
        col = col.astype(object)
    if pd.api.types.is_bool_dtype(col.dtype) and not col.isna().any():
        return col.to_numpy(dtype=bool)
    if pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype):
        values = col.to_numpy(dtype=np.float64, na_value=np.nan)
        if np.isin(values, (0.0, 1.0)).all():
            return values == 1
    else:
        words = col.map(lambda v: _FILTER_WORDS.get(str(v).strip().lower()) if isinstance(v, (str, bool, np.bool_))
                        else None)
        if words.notna().all():
            return words.to_numpy(dtype=bool)
    seen = sorted({repr(v.item() if isinstance(v, np.generic) else v) for v in col.unique()[:20]})
    msg = (f"{path}: obs column {FILTER_COLUMN!r} (rows {chunk.start}..{chunk.stop - 1}) holds values "
           f"{', '.join(seen[:10])}; it must be boolean, 0/1 or 'True'/'False' (1/True = keep the cell). "
           f"Fix the column (or drop it to keep every cell)")
    raise InputFileError(msg)


def _var_candidates(r, in_use: np.ndarray) -> dict[str, np.ndarray]:
    """The reader's other text var columns (and its var index), as gene-id alternatives to ``in_use``."""
    from ..readers._common import VAR_INDEX

    found = {}
    for c in r.var_columns:
        try:
            values = np.asarray(r.read_var_column(c), dtype=object)
        except InputFileError:
            continue  # a column in an encoding we cannot read is no gene-id candidate, and no reason to stop
        if values.size and isinstance(values[0], str):
            found[c] = values.astype(str)
    if hasattr(r, "read_var_index") and VAR_INDEX not in found:
        found[VAR_INDEX] = r.read_var_index()
    return {c: v for c, v in found.items() if not np.array_equal(v, in_use)}


def resolve_input(path: str, r, spec, *, gene_id_column: str | None,
                   allow_case_insensitive: bool) -> tuple[np.ndarray, Any]:
    """Gene ids -> tokens for one input; a default id source that another var column beats stops here."""
    from ..vocab.gene_ids import check_gene_id_choice

    kw = {"gene_name_map": spec.gene_name_map, "ortholog_map": spec.ortholog_map}
    if gene_id_column is None:
        _, first = resolve_genes(r.var_names, spec.vocab, **kw, min_fraction=0.0, source=path,
                                 allow_case_insensitive=True)
        check_gene_id_choice(first, _var_candidates(r, r.var_names), spec.vocab, **kw, source=path,
                             current_name="the default gene ids")
    return resolve_genes(r.var_names, spec.vocab, **kw, min_fraction=spec.min_gene_match, source=path,
                         allow_case_insensitive=allow_case_insensitive)
