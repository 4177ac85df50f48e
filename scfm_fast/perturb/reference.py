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


def reference_block(forward: Callable[[np.ndarray], torch.Tensor], plan: CellPlan, block: VariantBlock,
                    h0: torch.Tensor, *, pooling: str, gene_shifts: bool, target: torch.Tensor | None,
                    cell_readout: str = "genes", state_shift: str = "all") -> BlockResult:
    """Readouts of one block of variants, one plain forward per variant.

    ``forward(src)`` returns the readout-layer states ``(len(src), H)`` of the variant whose row ``j``
    comes from source position ``src[j]`` (the cell's, then the block's inserted genes).
    """
    L = len(plan.input_ids)
    ids = np.concatenate([plan.input_ids, block.inserted])  # inserted: sources L..
    targets = [] if target is None else list(target.reshape(-1, h0.shape[1]))
    cos, tshift, gtoks, gcos = [], [], [], []
    for v in range(block.n_variants):
        src = block.src[v]
        hv = forward(src).float()
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
            gtoks.append(np.asarray([ids[src[j]] for j in keep], dtype=np.int32))
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
        fl = self.layer if self.forward_layer is None else self.forward_layer
        ids = torch.as_tensor(np.concatenate([plan.input_ids, block.inserted]), device=h0.device)

        def forward(src: np.ndarray) -> torch.Tensor:
            return self.model.forward_reference(ids[torch.as_tensor(src, device=h0.device)][None], layer=fl)[0]

        res = reference_block(forward, plan, block, h0, **readout)
        if on_batch is not None:
            on_batch(block.n_variants)
        return res
