"""The one screen driver: cells (via ``open_cells``) -> targets (``TargetResolver``) -> plans -> an engine -> results.

:func:`run_engine` is what :func:`~scfm_fast.perturb.perturb_cells` (notebooks) and ``scfm perturb`` (one call
per shard) both run. Engines (:mod:`.reference`, :mod:`.exact`, :mod:`.approx`) implement one interface,
``unperturbed(ids) -> h0`` and ``run_block(plan, block, h0, *, on_batch=None, **readout) -> BlockResult``, and
import neither this module nor :mod:`.api`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
import torch

from .._dtypes import resolve_dtype
from .._errors import GeneMatchError, UsageError
from .._progress import progress as _progress
from ..embed.genecompass import check_family, is_genecompass
from ..store.cells import open_cells
from ..vocab.targets import TargetResolver
from ._inputs import check_cells, default_pooling, iter_positions, special_ids, to_cell_index
from ._results import ResultBuilder
from .plan import PERTURBATIONS, CellPlan, plan_cell

log = logging.getLogger(__name__)

MODES = ("exact", "approx")
CELL_READOUTS = ("genes", "pooled")
STATE_SHIFTS = ("all", "aligned")


#: each family's own readout layer (the model's behaviour is the default): Geneformer's InSilicoPerturber
#: reads ``hidden_states[-2]`` (``emb_layer=-1``), GeneCompass's ``perturb_delete_chipseq.py`` the last layer
FAMILY_LAYERS = {"bert": -2, "genecompass": -1}


def layer_of(layer: int | None, emb_layer: int | None) -> int | None:
    """Our readout layer from Geneformer's ``emb_layer`` (0 = last layer, -1 = second-to-last)."""
    if emb_layer is None:
        return layer
    if emb_layer not in (0, -1):
        msg = f"emb_layer={emb_layer} (--emb-layer): Geneformer's numbering is 0 (last layer) or -1 (second-to-last)"
        raise UsageError(msg)
    return emb_layer - 1


def family_of_model(model: Any) -> str:
    """The model family's name (a key of :data:`FAMILY_LAYERS`): ``"genecompass"`` or ``"bert"``."""
    return "genecompass" if is_genecompass(model) else "bert"


def readout_layer(family: str, *, layer: int | None = None, emb_layer: int | None = None) -> int:
    """The layer a screen reads: ``layer``, else ``emb_layer`` (Geneformer's numbering), else the family's own.

    Every front end (``perturb_cells``, ``scfm perturb``, ``state_embedding``) resolves its default here,
    so a screen and its state embeddings read the same layer.
    """
    if layer is not None and emb_layer is not None:
        msg = "give either --layer (layer=) or --emb-layer (emb_layer=, Geneformer's numbering), not both"
        raise UsageError(msg)
    resolved = layer_of(layer, emb_layer)
    # another registered family reads as Geneformer does
    return FAMILY_LAYERS.get(family, FAMILY_LAYERS["bert"]) if resolved is None else resolved


def default_batch_tokens(device: torch.device) -> int:
    """Token budget per batched forward: large on GPUs, cache-friendly on CPUs (measured: 2-4k best)."""
    return 131_072 if device.type == "cuda" else 4_096


def make_engine(engine: str, model: Any, *, n_layers: int, device: torch.device, dtype: torch.dtype | None,
                batch_tokens: int, layer: int, forward_layer: int | None = None) -> Any:
    """The engine named ``engine``; each has ``unperturbed(ids)`` and ``run_block(plan, block, h0, **readout)``."""
    if engine == "reference":
        from .reference import ReferenceEngine

        return ReferenceEngine(model, layer=layer, forward_layer=forward_layer, device=device)
    if engine == "exact":
        from .exact import ExactEngine

        return ExactEngine(model, n_layers=n_layers, device=device, dtype=dtype, batch_tokens=batch_tokens)
    if engine == "approx":
        from .approx import ApproxEngine

        return ApproxEngine(model, n_layers=n_layers, device=device, dtype=dtype, batch_tokens=batch_tokens)
    msg = f"mode={engine!r}; choose one of {MODES}"
    raise UsageError(msg)


def run_engine(
    tokens: Any,
    model: Any,
    *,
    engine: str,
    perturbation: str = "delete",
    genes: Any = "all",
    anchor: int | str | None = None,
    combine: bool = False,
    rank_shift: float = 0.25,
    rank_shift_quartiles: int | None = None,
    layer: int | None = None,
    emb_layer: int | None = None,
    pooling: str | None = None,
    cell_readout: str = "genes",
    batch_tokens: int | None = None,
    device: str | torch.device | None = None,
    dtype: Any = None,
    special_token_ids: Iterable[int] | None = None,
    token_dictionary: Any = None,
    gene_name_map: Any = None,
    orthologs: Any = None,
    gene_shifts: bool = False,
    target_embedding: Any = None,
    target_names: Iterable[str] | None = None,
    state_shift: str = "all",
    skip_absent: bool = False,
    progress_bar: bool = True,
    forward_layer: int | None = None,
    approx_check_cells: int = 1,
    with_file_index: bool = False,
    no_attention_mask: bool = False,
    pad_to: int | None = None,
) -> pd.DataFrame:
    """Shared driver: plan each cell, run one engine, collect the result table (see ``perturb_cells``)."""
    # option errors are UsageError / InputFileError (ValueError subclasses): the CLI reports them cleanly
    if perturbation not in PERTURBATIONS:
        msg = f"perturbation={perturbation!r}; choose one of {PERTURBATIONS}"
        raise UsageError(msg)
    if pooling not in (None, "mean", "cls"):
        msg = f"pooling={pooling!r}; use 'mean' or 'cls' (V2 models)"
        raise UsageError(msg)
    if cell_readout not in CELL_READOUTS:
        msg = f"cell_readout={cell_readout!r} (--cell-readout); choose one of {CELL_READOUTS}"
        raise UsageError(msg)
    if state_shift not in STATE_SHIFTS:
        msg = f"state_shift={state_shift!r} (--state-shift); choose one of {STATE_SHIFTS}"
        raise UsageError(msg)
    steps = 1
    if rank_shift_quartiles is not None:
        if rank_shift_quartiles not in (1, 2, 3):
            msg = f"rank_shift_quartiles={rank_shift_quartiles} (--rank-shift-quartiles): use 1, 2 or 3"
            raise UsageError(msg)
        rank_shift, steps = 0.25, int(rank_shift_quartiles)
    if perturbation in ("inhibit", "activate") and not 0 < rank_shift <= 1:
        msg = f"rank_shift={rank_shift} (--rank-shift): use a fraction of the cell's length in (0, 1], e.g. 0.25"
        raise UsageError(msg)
    from . import genecompass as gcp

    gc = gcp.is_genecompass(model)  # its genes carry values and a species row leads each cell
    gcp.check_options(model, perturbation=perturbation, engine=engine)
    layer = readout_layer(family_of_model(model), layer=layer, emb_layer=emb_layer)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(dev).eval()
    try:
        n_layers = (model.bert if gc else model).resolve_layer(layer)
    except ValueError as e:
        msg = f"{e} (--layer)"
        raise UsageError(msg) from None
    lowp = resolve_dtype(dtype)
    wdt = next(model.parameters()).dtype
    if lowp is None and wdt != torch.float32:
        lowp = wdt  # a bf16/fp16 checkpoint computes under autocast in its own dtype
    budget = int(batch_tokens or default_batch_tokens(dev))
    src = open_cells(tokens)
    resolver = TargetResolver.for_cells(src, token_dictionary=token_dictionary, gene_name_map=gene_name_map)
    if orthologs is not None:
        resolver = TargetResolver(token_dictionary, gene_name_map, orthologs)
    vocab = model.config.vocab_size
    # a joint (human + mouse) dictionary: symbols resolve in each cell's own species (gcp.SpeciesTargets)
    targets = gcp.species_targets(resolver, genes, combine=combine, anchor=anchor, vocab_size=vocab) if gc else None
    groups, unknown = targets.union() if targets is not None else resolver.resolve(genes, combine=combine)
    if groups is not None:  # token ids given as numbers must exist in the model (not "not expressed")
        outside = [g for g in groups if any(not 0 <= t < vocab for t in g)]
        unknown += [f"token id {'+'.join(map(str, g))} (the model has {vocab} tokens)" for g in outside]
        groups = [g for g in groups if g not in outside]
    if unknown:  # a typo must not run as a screen of the other genes with exit 0
        msg = (f"genes not in the token dictionary / model vocabulary: {unknown[:20]}"
               f"{' ...' if len(unknown) > 20 else ''}; give symbols, Ensembl IDs or token ids it holds")
        raise GeneMatchError(msg)
    anchor_tok = resolver.resolve_one(anchor) if anchor is not None and targets is None else None
    if targets is not None:
        anchor_tok = targets.first_anchor()
    if anchor_tok is not None and not 0 <= anchor_tok < vocab:
        anchor_tok = None
    if anchor is not None and anchor_tok is None:
        msg = f"anchor gene {anchor!r} (--anchor) is not in the token dictionary: give a symbol, Ensembl ID or token id"
        raise UsageError(msg)
    if anchor_tok is not None and groups is not None:
        groups = [tuple(dict.fromkeys((anchor_tok, *g))) for g in groups]
    special = special_ids(special_token_ids, src, resolver)
    if pooling is None:
        pooling = default_pooling(src, special)
    try:
        ens, sym = resolver.ensembl_of(), resolver.symbol_of()
    except Exception:  # a missing dictionary only costs the ensembl_id / gene_name columns
        ens = sym = None
    target, names = None, ()
    if target_embedding is not None:
        H = model.config.hidden_size
        target = torch.as_tensor(np.asarray(target_embedding), dtype=torch.float32, device=dev)
        if target.numel() % H or (target.dim() > 1 and target.shape[-1] != H):
            msg = (f"target_embedding has shape {tuple(target.shape)} but the model's hidden size is {H}: "
                   "compute it with the same model (state_embedding)")
            raise UsageError(msg)
        target = target.reshape(-1, H)
        names = tuple(target_names) if target_names is not None else ("target_shift",)
        if len(names) != target.shape[0]:
            msg = f"{target.shape[0]} target embeddings but {len(names)} target_names"
            raise UsageError(msg)
    builder = ResultBuilder(perturbation, anchor_tok, ens, target_columns=names, with_gene_shifts=gene_shifts,
                            symbol_of=sym)
    # plans (V x L index arrays) are built one cell at a time from tokens read part by part. Padding is
    # dropped (the engines run unpadded; the reference would mask it), so padded inputs give the same results.
    delete_all = groups is None and anchor_tok is None and perturbation == "delete"
    # either family's tokens with the other's model, species, --no-attention-mask: the checks of `scfm embed`
    check_family(src, model, pooling=pooling, no_attention_mask=no_attention_mask, pad_to=pad_to)
    total = check_cells(src, model, pooling=pooling, special=special, count_genes=delete_all)
    max_pos = model.config.max_position_embeddings

    def plans():
        if gc:
            for pos, ids, vals, sp in gcp.iter_cells(src, pad=model.config.pad_token_id):
                yield gcp.plan_genecompass_cell(ids, vals, pos, species=sp, perturbation=perturbation,
                                                groups=groups, special_token_ids=special, anchor=anchor_tok,
                                                targets=targets)
            return
        for pos, ids in iter_positions(src, pad=model.config.pad_token_id):
            yield plan_cell(ids, pos, perturbation=perturbation, groups=groups, special_token_ids=special,
                            anchor=anchor_tok, rank_shift=rank_shift, steps=steps,
                            insert_absent=not skip_absent, max_len=max_pos)

    opts = dict(pooling=pooling, gene_shifts=gene_shifts, target=target, cell_readout=cell_readout,
                state_shift=state_shift)
    attrs = dict(layer=layer, pooling=pooling, cell_readout=cell_readout, state_shift=state_shift)
    if gc:
        eng = gcp.make_engine(engine, model, n_layers=n_layers, device=dev, dtype=lowp, batch_tokens=budget,
                              layer=layer, no_attention_mask=no_attention_mask, pad_to=pad_to)
    else:
        eng = make_engine(engine, model, n_layers=n_layers, device=dev, dtype=lowp, batch_tokens=budget, layer=layer,
                          forward_layer=forward_layer)
    bar = _progress(total=total, desc=f"perturb ({engine})", unit="perturbations", enabled=progress_bar)
    check: list[CellPlan] = []  # the first cells, rerun exactly to measure the approximation
    for plan in plans():
        builder.skipped.extend(plan.skipped)
        if targets is not None:  # the anchor of this cell's species (pairs: the other member is gene_token)
            builder.anchor = targets.anchor.get(plan.species)
        if not plan.blocks:
            continue
        if engine == "approx" and len(check) < approx_check_cells:
            check.append(plan)
        h0 = eng.unperturbed_plan(plan) if gc else eng.unperturbed(torch.as_tensor(plan.input_ids, device=dev))
        for block in plan.blocks:
            builder.add(plan, block, eng.run_block(plan, block, h0, on_batch=bar.update, **opts))
    bar.close()
    df = builder.frame(mode=engine, **attrs)
    to_cell_index(df, src, with_file_index=with_file_index)
    if check:
        from .approx import approx_error_of

        err = approx_error_of(df, check, model, n_layers=n_layers, device=dev, dtype=lowp,
                              batch_tokens=budget, **opts)
        df.attrs["approx_error"] = err
        log.info("mode='approx' is APPROXIMATE: on %d cells rerun exactly, max |dcos| = %.2e, Spearman of "
                 "effect rankings = %.3f (mean), %.3f (min)", err["n_cells"], err["max_abs_dcos"],
                 err["spearman_mean"], err["spearman_min"])
    return df
