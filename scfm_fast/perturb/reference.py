"""The oracle: one plain forward pass per perturbed variant, then the readouts, written out plainly.

Every variant (and the unperturbed cell) runs alone (batch of one) through
:meth:`~scfm_fast.model.bert.BertEncoderModel.forward_reference`, as Geneformer's perturber does one
forward per variant. The exact engine (:mod:`scfm_fast.perturb.exact`) must match it within fp32
tolerance; tests and ``benchmarks/perturb.py`` import it from here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
import torch

from ._results import BlockResult
from .plan import CellPlan, VariantBlock


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))


def reference_block(model: Any, plan: CellPlan, block: VariantBlock, h0: torch.Tensor, *, layer: int,
                    pooling: str, gene_shifts: bool, target: torch.Tensor | None, cell_readout: str = "genes",
                    state_shift: str = "all", forward_layer: int | None = None) -> BlockResult:
    """Readouts of one block of variants, one ``forward_reference`` call per variant.

    ``forward_layer`` (default ``layer``) lets a benchmark run more layers than the readout needs (as
    Geneformer does, which always runs the whole model); the readout is then taken at that layer.
    """
    dev = h0.device
    L = len(plan.input_ids)
    ids = torch.as_tensor(np.concatenate([plan.input_ids, block.inserted]), device=dev)  # inserted: sources L..
    fl = layer if forward_layer is None else forward_layer
    targets = [] if target is None else list(target.reshape(-1, h0.shape[1]))
    cos, tshift, gtoks, gcos = [], [], [], []
    for v in range(block.n_variants):
        src = block.src[v]
        hv = model.forward_reference(ids[torch.as_tensor(src, device=dev)][None], layer=fl)[0].float()
        pert = set(int(p) for p in block.perturbed[v])
        # genes present in both sequences: not special, not perturbed; aligned by original position
        keep = [j for j, s in enumerate(src) if s < L and not plan.special[s] and int(s) not in pert]
        per_gene = [_cos(hv[j], h0[int(src[j])]) for j in keep]
        if pooling == "cls":
            pv, po = hv[0], h0[0]
            cos.append(_cos(pv, po))
        else:
            pv = hv[keep].mean(0)
            po = h0[[int(src[j]) for j in keep]].mean(0)
            cos.append(float(np.mean(per_gene)) if cell_readout == "genes" else _cos(pv, po))
        if targets:
            if pooling == "mean" and state_shift == "all":  # every gene of each cell
                pv = hv[[j for j, s in enumerate(src) if s >= L or not plan.special[s]]].mean(0)
                # the original less the genes an insertion cut from its end
                there = set(int(s) for s in src) | pert
                po = h0[[i for i in range(L) if not plan.special[i] and i in there]].mean(0)
            tshift.append([_cos(pv, t) - _cos(po, t) for t in targets])
        if gene_shifts:
            gtoks.append(np.asarray([int(ids[src[j]]) for j in keep], dtype=np.int32))
            gcos.append(np.asarray(per_gene, dtype=np.float32))
    return BlockResult(np.asarray(cos), np.asarray(tshift) if targets else None,
                       gtoks if gene_shifts else None, gcos if gene_shifts else None)


def perturb_cells_reference(
    tokens: Any,
    model: Any,
    *,
    perturbation: str = "delete",
    genes: Any = "all",
    anchor: int | str | None = None,
    combine: bool = False,
    rank_shift: float = 0.25,
    rank_shift_quartiles: int | None = None,
    layer: int = -2,
    emb_layer: int | None = None,
    pooling: str | None = None,
    cell_readout: str = "genes",
    device: str | torch.device | None = None,
    special_token_ids: Iterable[int] | None = None,
    token_dictionary: Any = None,
    gene_name_map: Any = None,
    orthologs: Any = None,
    gene_shifts: bool = False,
    target_embedding: Any = None,
    target_names: Any = None,
    state_shift: str = "all",
    skip_absent: bool = False,
    forward_layer: int | None = None,
    progress_bar: bool = True,
) -> pd.DataFrame:
    """Reference in-silico perturbation: one plain fp32 forward pass per variant (batch of one).

    Parameters
    ----------
    tokens, model, perturbation, genes, anchor, combine, rank_shift, rank_shift_quartiles, layer, \
emb_layer, pooling, cell_readout, device, special_token_ids, token_dictionary, gene_name_map, orthologs, \
gene_shifts, target_embedding, target_names, state_shift, skip_absent, progress_bar
        As for :func:`scfm_fast.perturb.perturb_cells`.
    forward_layer
        Run the model up to this layer and read out there instead of ``layer`` (benchmarks use ``-1`` to
        time Geneformer's whole-model forward).

    Returns
    -------
    pandas.DataFrame
        The same table as :func:`scfm_fast.perturb.perturb_cells` (``attrs["mode"] == "reference"``).
    """
    from .api import run_engine

    return run_engine(tokens, model, engine="reference", perturbation=perturbation, genes=genes, anchor=anchor,
                      combine=combine, rank_shift=rank_shift, rank_shift_quartiles=rank_shift_quartiles,
                      layer=layer, emb_layer=emb_layer, pooling=pooling, cell_readout=cell_readout,
                      device=device, special_token_ids=special_token_ids, token_dictionary=token_dictionary,
                      gene_name_map=gene_name_map, orthologs=orthologs, gene_shifts=gene_shifts,
                      target_embedding=target_embedding, target_names=target_names, state_shift=state_shift,
                      skip_absent=skip_absent, forward_layer=forward_layer, progress_bar=progress_bar)
