"""Cell states for screens: select cells by a metadata column, and a state's mean embedding.

Geneformer models disease -> healthy screens with ``cell_states_to_model``: perturb the cells of a start
state and measure how far each perturbation moves them toward a goal state, represented by the mean
embedding of the goal state's cells. Here :func:`select_cells` picks cells of a token table by the
metadata columns the tokenizer carried (``scfm tokenize --obs-columns``), and :func:`state_embedding`
computes a state's mean embedding with the same model, layer, pooling and special tokens as the screen
(``perturb_cells(..., target_embedding=...)`` then adds ``target_shift``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import InputFileError, UsageError
from ..store.cells import CellSource, open_cells


def parse_where(spec: str) -> dict[str, list[str]]:
    """``"COLUMN=V1,V2"`` (several joined by ``;``) -> ``{"COLUMN": ["V1", "V2"]}``."""
    out: dict[str, list[str]] = {}
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        col, sep, vals = part.partition("=")
        values = [v.strip() for v in vals.split(",") if v.strip()]
        if not sep or not col.strip() or not values:
            msg = f"{spec!r}: expected COLUMN=VALUE[,VALUE...] (e.g. disease=dcm), several joined by ';'"
            raise UsageError(msg)
        out.setdefault(col.strip(), []).extend(values)
    if not out:
        msg = f"{spec!r}: expected COLUMN=VALUE[,VALUE...]"
        raise UsageError(msg)
    return out


def select_source(src: CellSource, where: Mapping[str, str | Sequence[str]]) -> CellSource:
    """The view of ``src`` whose metadata match ``where`` (:meth:`CellSource.select`); a value no cell has
    is an input problem (:class:`InputFileError`) naming the values present."""
    try:
        return src.select(where=dict(where))
    except UsageError as e:
        raise InputFileError(str(e)) from None


def select_cells(tokens: Any, where: Mapping[str, str | Sequence[str]]):
    """The cells of a token source whose metadata match ``where`` (every column, any of its values).

    Only the matching cells' tokens are read, so selecting a cell type from a whole corpus is cheap.

    Parameters
    ----------
    tokens
        Anything :func:`~scfm_fast.store.cells.open_cells` opens (a token dataset directory, a token
        table, ...) with metadata columns.
    where
        ``{column: value or values}``; values are compared as strings, so ``{"batch": "3"}`` matches an
        integer column too.

    Returns
    -------
    pyarrow.Table
        ``input_ids``, ``cell_index``, ``file_index`` and the ``where`` columns of the matching cells, in
        dataset order.
    """
    import pyarrow as pa

    picked = select_source(open_cells(tokens), where)
    ids, cu = picked.take_packed(np.arange(len(picked)))
    cols = {"input_ids": pa.ListArray.from_arrays(pa.array(cu), pa.array(ids)),
            "cell_index": pa.array(np.asarray(picked.cell_index, dtype=np.int64)),
            "file_index": pa.array(np.asarray(picked.file_index, dtype=np.int32))}
    meta = picked.columns([c for c in where if c not in cols])
    return pa.table({**cols, **{c: meta.column(c) for c in meta.column_names}})


def state_embedding(tokens: Any, model: Any, *, where: Mapping[str, str | Sequence[str]] | None = None,
                    layer: int | None = None, pooling: str = "mean", special_token_ids: Iterable[int] | None = None,
                    token_dictionary: Any = None, batch_tokens: int | None = None, device: Any = None,
                    dtype: Any = None, progress_bar: bool = True, max_cells: int | None = None, seed: int = 0,
                    aggregate: str = "mean", no_attention_mask: bool = False) -> tuple[np.ndarray, int]:
    """Mean (or median) cell embedding of a cell state, read out as a perturbation screen reads its cells.

    Parameters
    ----------
    tokens
        Token dataset directory or ``pyarrow.Table`` (see :func:`select_cells`), or a list of token arrays
        when ``where`` is ``None``.
    model
        The screen's :class:`~scfm_fast.model.bert.BertEncoderModel`.
    where
        Which cells form the state, e.g. ``{"disease": "nf"}``; ``None``: all of ``tokens``.
    layer, pooling, special_token_ids, token_dictionary
        As for :func:`~scfm_fast.perturb.perturb_cells` (the same defaults: ``layer=None`` reads the model
        family's own layer), so the state and the perturbed cells are embedded alike.
    batch_tokens, device, dtype, progress_bar
        As for :func:`~scfm_fast.embed.embed_tokens`.
    max_cells, seed
        Use at most this many of the state's cells, drawn without replacement with this seed
        (Geneformer's ``max_ncells`` per state, 1,000); ``None``: all of them.
    aggregate
        ``"mean"`` (Geneformer's default) or ``"median"`` (element-wise) over the cells.
    no_attention_mask
        GeneCompass only: embed with pads that attend, as a ``no_attention_mask`` screen reads its cells.

    Returns
    -------
    embedding
        ``float64 (hidden,)``, the mean / median over the state's cells (cells without genes are left out).
    n_cells
        How many cells it averages.
    """
    from ..embed import embed_tokens
    from ..vocab.targets import TargetResolver
    from ._inputs import special_ids
    from .screen import family_of_model, readout_layer

    if aggregate not in ("mean", "median"):
        msg = f"aggregate={aggregate!r}; use 'mean' or 'median'"
        raise UsageError(msg)
    src = open_cells(tokens)
    cells = select_source(src, where) if where else src
    n_all = len(cells)
    if max_cells is not None and n_all > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(n_all, size=max_cells, replace=False))
        cells = cells.subset(rows)
    specials = special_ids(special_token_ids, src, TargetResolver(token_dictionary))
    layer = readout_layer(family_of_model(model), layer=layer)
    emb, _ = embed_tokens(cells, model, layer=layer, pooling=pooling, batch_tokens=batch_tokens, device=device,
                          dtype=dtype, special_token_ids=specials, progress_bar=progress_bar,
                          **({"no_attention_mask": True} if no_attention_mask else {}))
    ok = np.isfinite(emb).all(axis=1)
    if not ok.any():
        msg = f"cell state {dict(where) if where else 'of all cells'}: no cell has any gene token to embed"
        raise InputFileError(msg)
    emb = emb[ok].astype(np.float64)
    return (np.median(emb, axis=0) if aggregate == "median" else emb.mean(axis=0)), int(ok.sum())


def parse_cell_states(spec: str) -> dict[str, Any]:
    """``--cell-states``: inline JSON or a JSON file -> Geneformer's ``cell_states_to_model`` dict.

    Keys ``state_key`` (metadata column), ``start_state`` (cells to perturb), ``goal_state`` and optional
    ``alt_states`` (list); returns them with ``alt_states`` always a list.
    """
    import json

    text = spec
    if not spec.lstrip().startswith("{"):
        p = Path(spec)
        if not p.is_file():
            msg = f"{spec}: --cell-states file not found (give inline JSON or a .json file)"
            raise InputFileError(msg)
        text = p.read_text()
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        msg = f"--cell-states: not valid JSON ({e}); e.g. '{{\"state_key\": \"disease\", \"start_state\": \"dcm\", \"goal_state\": \"nf\", \"alt_states\": [\"hcm\"]}}'"
        raise UsageError(msg) from None
    missing = [k for k in ("state_key", "start_state", "goal_state") if not isinstance(d, dict) or k not in d]
    if missing:
        msg = f"--cell-states: missing {missing} (keys: state_key, start_state, goal_state, alt_states)"
        raise UsageError(msg)
    alts = d.get("alt_states") or []
    alts = [alts] if isinstance(alts, str) else [str(a) for a in alts]
    extra = set(d) - {"state_key", "start_state", "goal_state", "alt_states"}
    if extra:
        msg = f"--cell-states: unknown keys {sorted(extra)}"
        raise UsageError(msg)
    states = [str(d["goal_state"]), *alts]
    if len(set(states)) != len(states):
        msg = f"--cell-states: goal and alt states must differ (got {states})"
        raise UsageError(msg)
    return {"state_key": str(d["state_key"]), "start_state": str(d["start_state"]),
            "goal_state": str(d["goal_state"]), "alt_states": alts}
