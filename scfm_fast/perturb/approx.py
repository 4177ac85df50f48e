"""APPROXIMATE perturbation engine (opt-in, ``mode="approx"``): reuse the unperturbed cell's K/V cache.

What it computes
----------------
The unperturbed cell runs once, keeping at every layer ``l`` its queries ``Q_l``, keys ``K_l``, values
``V_l``, per-row attention output ``O_l`` and softmax log-normaliser ``LSE_l``. A variant then runs with
its exact embeddings (token + shifted positions, shared as in the exact engine), but at every layer:

* genes that are still present and were not moved keep the original cell's ``q``/``k``/``v`` (taken from
  the cache at their original position): **their K/V are not recomputed, and neither are their queries**;
* only the perturbed genes' keys/values change: a deleted gene's ``(k, v)`` is removed, a moved gene's
  ``(k, v)`` is recomputed from its own (perturbed) hidden state at its new position, and its query row
  attends over the cached K/V of all other genes plus its own new key;
* each unchanged row's attention output is updated from the cached one by softmax bookkeeping, exactly
  for that key set: ``o' = (e^{LSE} o - sum_removed e^{s} v + sum_new e^{s'} v') /
  (e^{LSE} - sum_removed e^{s} + sum_new e^{s'})`` - ``O(m * d)`` per row instead of ``O(L * d)``;
* the output projection, residual LayerNorms and feed-forward run on every row of the variant, so the
  perturbation propagates through the residual stream to the readout layer.

What it leaves out (the approximation): how earlier-layer changes alter the *other* genes' queries, keys
and values (second-order effects), and the position shift of genes behind a deleted / moved gene inside
attention (their residual stream does use the shifted position embeddings). The error is therefore zero
at ``layer=0`` and grows with depth; :func:`measure_approx_error` and ``df.attrs["approx_error"]`` report
it against the exact engine (max ``|dcos|`` and the Spearman correlation of per-gene effect rankings).

Cost per variant and layer: ``L*(d^2 + 2*d*d_ff)`` (output projection + FFN) instead of the exact
``L*(4*d^2 + 2*d*d_ff) + 4*L^2*d``: attention, the largest term for long cells, becomes ``O(L*m*d)``.
Rows whose removed key held (nearly) all of their attention mass have a denominator close to 0; it is
clamped at ``1e-6`` of the cached normaliser, which bounds but does not remove that error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..model.cached_attention import attention_over_two_sets, attention_with_lse, update_attention
from ..model.layers import EncoderParams, autocast_ctx
from ._results import BlockResult
from .exact import ExactEngine, concat_results, embedding_index, readout
from .plan import CellPlan, VariantBlock


class ApproxEngine:
    """KV-cache-reuse engine (see the module docstring); same interface as :class:`ExactEngine`."""

    def __init__(self, model: Any, *, n_layers: int, device: torch.device, dtype: torch.dtype | None,
                 batch_tokens: int) -> None:
        self.P = EncoderParams(model)
        self.n_layers = n_layers
        self.device = device
        self.dtype = dtype
        self.batch_tokens = batch_tokens
        self.cache: list[dict[str, torch.Tensor]] = []
        self.model = model
        self._exact: ExactEngine | None = None

    @torch.no_grad()
    def unperturbed(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the cell once, caching each layer's (L, nh, hd) q/k/v/o and (L, nh) log-normaliser.

        ``o`` and the log-normaliser are kept in float64: the update removes a key's share from them,
        and where that key held most of a row's attention mass (``den`` near 0) fp32 rounding of ``o``
        would be amplified by ``1/den`` (measured: 1.6e-5 on a delete the update makes exact).
        """
        P, L = self.P, ids.shape[0]
        scale = 1.0 / math.sqrt(P.head_dim)
        self.cache = []
        with autocast_ctx(self.device, self.dtype):
            h = P.embed(ids[None], torch.arange(L, device=self.device)[None])
        for i in range(self.n_layers):
            with autocast_ctx(self.device, self.dtype):
                qkv = P.qkv(i, h)
            q, k, v = (P.split_heads(t.float())[0] for t in qkv.chunk(3, dim=-1))  # (nh, L, hd)
            o, lse = attention_with_lse(q, k, v, scale=scale)
            self.cache.append({n: t.transpose(0, 1).contiguous()
                               for n, t in (("q", q), ("k", k), ("v", v), ("o", o))})
            self.cache[-1]["lse"] = lse.transpose(0, 1).contiguous()
            with autocast_ctx(self.device, self.dtype):
                h = P.post_attention(i, P.merge_heads(o[None].float()).to(h.dtype), h)
        return h[0].float()

    def _attend(self, i: int, h: torch.Tensor, src: torch.Tensor, rm: torch.Tensor,
                new_pos: torch.Tensor | None) -> torch.Tensor:
        """Approximate attention context ``(B, L', H)`` of layer ``i`` for a batch of variants."""
        P, c = self.P, self.cache[i]
        scale = 1.0 / math.sqrt(P.head_dim)
        B, Lp, _ = h.shape
        # the softmax bookkeeping runs in float64 (model.cached_attention); the result returns to float32
        q = c["q"][src].transpose(1, 2)        # (B, nh, L', hd): cached queries
        o = c["o"][src].transpose(1, 2)
        lse = c["lse"][src].transpose(1, 2)    # (B, nh, L')
        k_rm, v_rm = c["k"][rm].transpose(1, 2), c["v"][rm].transpose(1, 2)  # (B, nh, m, hd)
        if new_pos is None:
            return P.merge_heads(update_attention(q, o, lse, k_rm, v_rm, scale=scale).float())
        bi = torch.arange(B, device=h.device)[:, None]
        with autocast_ctx(self.device, self.dtype):
            qkv_m = P.qkv(i, h[bi, new_pos])
        qn, kn, vn = (P.split_heads(t.double()) for t in qkv_m.chunk(3, dim=-1))  # (B, nh, m, hd)
        ctx = update_attention(q, o, lse, k_rm, v_rm, scale=scale, k_new=kn, v_new=vn)
        # the moved genes' own rows: fresh query over cached keys (their old key removed) + new keys
        gone = torch.zeros(B, 1, 1, c["k"].shape[0], dtype=torch.bool, device=h.device)
        gone.scatter_(-1, rm[:, None, None, :].expand(B, 1, 1, -1), value=True)
        ctx_m = attention_over_two_sets(qn, c["k"].transpose(0, 1)[None], c["v"].transpose(0, 1)[None], gone,
                                        kn, vn, scale=scale)  # (B, nh, m, hd)
        ctx[bi, :, new_pos] = ctx_m.transpose(1, 2)
        return P.merge_heads(ctx.float())

    @torch.no_grad()
    def run_block(self, plan: CellPlan, block: VariantBlock, h0: torch.Tensor, *, pooling: str,
                  gene_shifts: bool, target: torch.Tensor | None, cell_readout: str = "genes",
                  state_shift: str = "all", on_batch: Callable[[int], None] | None = None) -> BlockResult:
        P, dev = self.P, self.device
        opts = dict(pooling=pooling, gene_shifts=gene_shifts, target=target, cell_readout=cell_readout,
                    state_shift=state_shift, on_batch=on_batch)
        if len(block.inserted):
            # an inserted gene has no cached K/V to update: these variants run exactly (the same h0)
            if self._exact is None:
                self._exact = ExactEngine(self.model, n_layers=self.n_layers, device=dev, dtype=self.dtype,
                                          batch_tokens=self.batch_tokens)
            return self._exact.run_block(plan, block, h0, **opts)
        L = len(plan.input_ids)
        ids = torch.as_tensor(plan.input_ids, device=dev)
        flat, offs, xs, xo = embedding_index(block.src, L)
        with autocast_ctx(dev, self.dtype):
            ar = torch.arange(L, device=dev)
            tabs = [P.embed(ids, (ar + int(o)).clamp(0, P.max_pos - 1)) for o in offs]
            if len(xs):
                xs_t = torch.as_tensor(xs, device=dev)
                tabs.append(P.embed(ids[xs_t], xs_t + torch.as_tensor(xo, device=dev)))
            emb = torch.cat(tabs) if len(tabs) > 1 else tabs[0]
        flat_t = torch.as_tensor(flat, device=dev)
        moved = block.new_pos[0, 0] >= 0
        # the approximate path holds a few (B, nh, L', hd) fp32 gathers: a smaller batch than exact
        per = max(1, self.batch_tokens // block.length)
        parts = []
        for b0 in range(0, block.n_variants, per):
            b1 = min(b0 + per, block.n_variants)
            src = torch.as_tensor(block.src[b0:b1], device=dev)
            rm = torch.as_tensor(block.perturbed[b0:b1], device=dev)
            new_pos = torch.as_tensor(block.new_pos[b0:b1], device=dev) if moved else None
            h = emb[flat_t[b0:b1]]
            for i in range(self.n_layers):
                ctx = self._attend(i, h.float(), src, rm, new_pos)
                with autocast_ctx(dev, self.dtype):
                    h = P.post_attention(i, ctx.to(h.dtype), h)
            parts.append(readout(h0, h.float(), plan, block, slice(b0, b1), pooling=pooling,
                                 gene_shifts=gene_shifts, target=target, cell_readout=cell_readout,
                                 state_shift=state_shift))
            if on_batch is not None:
                on_batch(b1 - b0)
        return concat_results(parts)


def compare_results(exact: np.ndarray, approx: np.ndarray, cell: np.ndarray) -> dict[str, float]:
    """Max/mean |dcos| and Spearman correlation (per cell, then min/mean) of the effect rankings."""
    from scipy.stats import spearmanr

    d = np.abs(np.asarray(exact) - np.asarray(approx))
    rhos = []
    for c in np.unique(cell):
        sel = cell == c
        if sel.sum() >= 3 and np.ptp(exact[sel]) > 1e-9:
            r = spearmanr(exact[sel], approx[sel]).statistic
            rhos.append(float(r) if np.isfinite(r) else 0.0)
    return {"max_abs_dcos": float(d.max()) if len(d) else 0.0,
            "mean_abs_dcos": float(d.mean()) if len(d) else 0.0,
            "spearman_mean": float(np.mean(rhos)) if rhos else float("nan"),
            "spearman_min": float(np.min(rhos)) if rhos else float("nan"),
            "n_cells": int(len(np.unique(cell))), "n_variants": int(len(d))}


def approx_error_of(df: Any, plans: list[CellPlan], model: Any, *, n_layers: int, device: torch.device,
                    dtype: torch.dtype | None, batch_tokens: int, pooling: str, gene_shifts: bool,
                    target: torch.Tensor | None, cell_readout: str = "genes",
                    state_shift: str = "all") -> dict[str, float]:
    """Rerun ``plans`` with both engines and compare (used for ``df.attrs["approx_error"]``)."""
    del df, gene_shifts
    ex = ExactEngine(model, n_layers=n_layers, device=device, dtype=dtype, batch_tokens=batch_tokens)
    ap = ApproxEngine(model, n_layers=n_layers, device=device, dtype=dtype, batch_tokens=batch_tokens)
    e_all, a_all, cells = [], [], []
    for plan in plans:
        ids = torch.as_tensor(plan.input_ids, device=device)
        he, ha = ex.unperturbed(ids), ap.unperturbed(ids)
        for block in plan.blocks:
            kw = dict(pooling=pooling, gene_shifts=False, target=target, cell_readout=cell_readout,
                      state_shift=state_shift)
            e_all.append(ex.run_block(plan, block, he, **kw).cos_sim)
            a_all.append(ap.run_block(plan, block, ha, **kw).cos_sim)
            cells.append(np.full(block.n_variants, plan.cell_index))
    if not e_all:
        return compare_results(np.zeros(0), np.zeros(0), np.zeros(0))
    return compare_results(1 - np.concatenate(e_all), 1 - np.concatenate(a_all), np.concatenate(cells))
