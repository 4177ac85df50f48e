"""The oracle: one plain forward pass per perturbed variant, then the readouts, written out plainly.

Every variant (and the unperturbed cell) runs alone (batch of one) through
:meth:`~scfm_fast.model.bert.BertEncoderModel.forward_reference`, as Geneformer's perturber does one
forward per variant. The exact engine (:mod:`scfm_fast.perturb.exact`) must match it within fp32
tolerance. :func:`~scfm_fast.perturb.perturb_cells_reference` runs it over a screen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
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


class ReferenceEngine:
    """The oracle behind the engines' interface: ``unperturbed(ids)`` and ``run_block(plan, block, h0, ...)``.

    ``forward_layer`` (default ``layer``) runs more layers than the readout needs, as Geneformer does.
    """

    def __init__(self, model: Any, *, layer: int, forward_layer: int | None = None,
                 device: torch.device | None = None) -> None:
        self.model, self.layer, self.forward_layer, self.device = model, layer, forward_layer, device

    def unperturbed(self, ids: torch.Tensor) -> torch.Tensor:
        """Readout-layer states ``(L, H)`` (fp32) of the unperturbed cell."""
        fl = self.layer if self.forward_layer is None else self.forward_layer
        return self.model.forward_reference(ids[None], layer=fl)[0].float()

    def run_block(self, plan: CellPlan, block: VariantBlock, h0: torch.Tensor, *,
                  on_batch: Callable[[int], None] | None = None, **readout: Any) -> BlockResult:
        res = reference_block(self.model, plan, block, h0, layer=self.layer, forward_layer=self.forward_layer,
                              **readout)
        if on_batch is not None:
            on_batch(block.n_variants)
        return res
