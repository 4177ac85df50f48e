"""GeneCompass cells through the embed path: family checks and one varlen batch.

A GeneCompass model reads a value beside each token and a species per cell, so its batches come from
the cell source's ``take_values`` / ``species`` and run :meth:`GeneCompassModel.forward_varlen`
(the species row is one more row per cell). ``pooling="cls"`` is that species row's output (without
``genes``, :meth:`GeneCompassModel.forward_species_rows`: the last layer runs for those rows only),
``"mean"`` the mean over the cell's genes. ``no_attention_mask`` pads each cell with ``(0, 0.0)``
genes that attend, as GeneCompass's own embedding scripts do (they pass no attention mask).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._errors import InputFileError, UsageError
from ..store.cells import CellSource


def is_genecompass(model: Any) -> bool:
    """Whether ``model`` is a :class:`~scfm_fast.model.genecompass.GeneCompassModel`."""
    from ..model.genecompass import GeneCompassModel

    return isinstance(model, GeneCompassModel)


def check_family(src: CellSource, model: Any, *, pooling: str, no_attention_mask: bool = False,
                 pad_to: int | None = None) -> None:
    """Refuse tokens of the other family, and GeneCompass options the model or the cells cannot take.

    Raises
    ------
    UsageError
        GeneCompass tokens (with values) for a Geneformer model or the reverse; ``cls`` pooling without a
        species row; ``no_attention_mask`` / ``pad_to`` with a Geneformer model or a bad ``pad_to``.
    InputFileError
        A cell whose species is neither 0 (human) nor 1 (mouse) (names the cell).
    """
    gc = is_genecompass(model)
    if gc and not src.has_values:
        msg = (f"{src.name}: these tokens have no per-token values (Geneformer tokens) but the model is a "
               "GeneCompass checkpoint; tokenize with --preset genecompass and the checkpoint's token dictionary")
        raise UsageError(msg)
    if not gc and src.has_values:
        msg = (f"{src.name}: these are GeneCompass tokens (with per-token values) but the model is a "
               "Geneformer (BERT) checkpoint; use a GeneCompass checkpoint, or tokenize with a Geneformer preset")
        raise UsageError(msg)
    if not gc:
        if no_attention_mask or pad_to is not None:
            msg = "no_attention_mask / pad_to (--no-attention-mask) apply to GeneCompass checkpoints only"
            raise UsageError(msg)
        return
    if pooling == "cls" and not model.gcfg.use_cls_token:
        msg = "pooling 'cls' reads the species row, but this GeneCompass checkpoint has none (use_cls_token false); use --pool mean"
        raise UsageError(msg)
    if pad_to is not None and not no_attention_mask:
        msg = "pad_to only applies with no_attention_mask (without it nothing is padded)"
        raise UsageError(msg)
    n_pos = model.config.max_position_embeddings
    if pad_to is not None and not 1 <= pad_to <= n_pos:
        msg = f"pad_to={pad_to}: must lie in 1..{n_pos} (the model's positions)"
        raise UsageError(msg)
    longest = int(src.lengths.max()) if len(src) else 0
    if no_attention_mask and longest > (pad_to or n_pos):
        msg = f"{src.name}: a cell has {longest} genes, more than pad_to={pad_to}; raise pad_to"
        raise UsageError(msg)
    species = src.species
    if species is not None:
        bad = np.flatnonzero((species != 0) & (species != 1))
        if bad.size:
            msg = (f"{src.name}: cell {src.cell_index[bad[0]]} has species {species[bad[0]]}; GeneCompass takes "
                   "0 (human) or 1 (mouse): tokenize with --species human|mouse or a valid species column")
            raise InputFileError(msg)


def batch_lengths(src: CellSource, model: Any, *, no_attention_mask: bool, pad_to: int | None) -> np.ndarray:
    """Rows each cell costs in a batch (its genes, or the padded length when pads attend)."""
    if no_attention_mask:
        return np.full(len(src), pad_to or model.config.max_position_embeddings, dtype=np.int64)
    return np.asarray(src.lengths, dtype=np.int64)


def embed_batch(model: Any, src: CellSource, pos: np.ndarray, *, layer: int, pooling: str, genes: bool,
                device: torch.device, lowp: torch.dtype | None, no_attention_mask: bool = False,
                pad_to: int | None = None) -> tuple[np.ndarray, dict | None]:
    """Cell embeddings ``(len(pos), H)`` of the cells at ``pos`` and, with ``genes``, their gene rows."""
    from ..model.genecompass import pool_cells

    ids, cu = src.take_packed(pos)
    vals = np.concatenate(src.take_values(pos)) if ids.size else np.zeros(0, np.float32)
    species = src.species
    sp = np.zeros(len(pos), np.int64) if species is None else np.asarray(species[pos], np.int64)
    args = (torch.from_numpy(ids).to(device), torch.from_numpy(vals).to(device), torch.from_numpy(sp).to(device),
            torch.from_numpy(cu).to(device), int(np.diff(cu).max()))
    kw = {"layer": layer, "no_attention_mask": no_attention_mask, "pad_to": pad_to}
    with torch.autocast(device.type, dtype=lowp, enabled=lowp is not None and lowp != torch.float32):
        if pooling == "cls" and not genes:  # only the species rows are read: the last layer runs for them only
            return model.forward_species_rows(*args, **kw).float().cpu().numpy(), None
        h, rows, cu_new = model.forward_varlen(*args, **kw)
    emb = pool_cells(h, cu_new, rows, pool=pooling)
    gene = {"ids": ids, "h": h[rows].float().cpu().numpy()} if genes else None
    return emb.float().cpu().numpy(), gene
