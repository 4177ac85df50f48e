"""Batched exact perturbation engine.

For each cell, all variants of one block have one length, so they run as large unpadded batches
(``batch_tokens`` tokens per forward, no padding, no mask). Exactly the reference's arithmetic, minus
what is provably redundant:

* the unperturbed cell runs once per cell, not once per variant;
* no MLM head, and no layer past the readout layer;
* embedding rows are per-token functions of (token, position). A variant's row ``j`` comes from original
  position ``src[j]`` at position ``j``, i.e. at position offset ``d = j - src[j]`` (``0`` for the
  unshifted prefix, ``-1`` for the suffix after a deleted gene, ``+1`` for genes overtaken by an
  overexpressed one). For each offset shared by many rows, the embedding LayerNorm of the whole cell is
  computed once (a table of ``L`` rows) and gathered per variant; rare offsets (a moved gene) are computed
  once per unique (source, offset) pair;
* the first layer's Q/K/V projections are per-token functions of those embedding rows too, so they are
  computed on the same tables and gathered, instead of projected ``V x L`` times;
* with a ``<cls>`` readout (and no per-gene shifts), the last layer computes keys and values for every
  row but its query, attention and feed-forward for row 0 only.

Everything after the first attention depends on the whole variant and is computed per variant.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..model.layers import EncoderParams, autocast_ctx
from ._results import BlockResult
from .plan import CellPlan, VariantBlock


def embedding_index(src: np.ndarray, L: int, *, min_share: int | None = None):
    """Map every (variant, position) to a row of shared embedding tables.

    Returns ``(flat, table_offsets, extra_src, extra_off)``: rows ``t*L + s`` are table ``t`` (offset
    ``table_offsets[t]``) at source ``s``; rows ``n_tables*L + e`` are the unique extra pairs.
    """
    V, Lp = src.shape
    d = np.arange(Lp, dtype=np.int64)[None, :] - src
    counts = np.bincount((d + L).ravel(), minlength=2 * L + 1)
    # a table costs L rows; it pays once more than ~L/4 rows use it
    share = max(1, L // 4) if min_share is None else min_share
    offs = np.flatnonzero(counts >= share) - L
    tid = np.full(2 * L + 1, -1, dtype=np.int64)
    tid[offs + L] = np.arange(len(offs))
    t = tid[d + L]
    flat = np.where(t >= 0, t * L + src, -1)
    miss = t < 0
    if miss.any():
        key = src[miss] * (2 * L + 1) + (d[miss] + L)
        uk, inv = np.unique(key, return_inverse=True)
        flat[miss] = len(offs) * L + inv
        extra_src, extra_off = uk // (2 * L + 1), uk % (2 * L + 1) - L
    else:
        extra_src = extra_off = np.zeros(0, dtype=np.int64)
    return flat, offs, extra_src, extra_off


def readout(h0: torch.Tensor, hv: torch.Tensor, plan: CellPlan, block: VariantBlock, rows: slice, *,
            pooling: str, gene_shifts: bool, target: torch.Tensor | None, cell_readout: str = "genes",
            state_shift: str = "all") -> BlockResult:
    """Batched readouts of variants ``rows`` of ``block`` (``hv``: their readout-layer states, fp32).

    ``cos_sim``: with ``pooling="cls"`` the cosine of the ``<cls>`` rows; with mean pooling and
    ``cell_readout="genes"`` (Geneformer's) the mean of the aligned genes' own cosines, with
    ``"pooled"`` the cosine of the two mean-pooled embeddings of the aligned genes. ``target`` ``(S, H)``:
    ``cos(perturbed, state) - cos(original, state)`` per state, the cells pooled over all their genes
    (``state_shift="all"``, Geneformer today) or over the aligned genes (``"aligned"``, its 2023 code).
    """
    dev = hv.device
    B, Lp, H = hv.shape
    L, k = h0.shape[0], len(block.inserted)
    Le = L + k  # source positions: the original cell, then the block's inserted genes
    src = torch.as_tensor(block.src[rows], device=dev)
    pert = torch.as_tensor(block.perturbed[rows], device=dev)
    special = torch.as_tensor(plan.special, device=dev)
    spec_e = torch.cat([special, torch.zeros(k, dtype=torch.bool, device=dev)])
    orig_e = torch.arange(Le, device=dev) < L
    pm = torch.zeros(B, Le, dtype=torch.bool, device=dev).scatter_(1, pert, value=True)
    inv = torch.zeros(B, Le, dtype=torch.bool, device=dev).scatter_(1, src, value=True)
    orig_all = (~spec_e & orig_e)[None] & (inv | pm)  # the original's genes, less any cut by an insertion
    valid_o = orig_all & inv & ~pm          # aligned genes, indexed by (extended) source position
    valid_v = valid_o.gather(1, src)        # the same genes, indexed by variant position
    if k:
        h0 = torch.cat([h0, h0.new_zeros(k, H)])

    def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)

    def mean_rows(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        w = w.to(h.dtype)
        return (w[:, None, :] @ h)[:, 0] / w.sum(1, keepdim=True)

    h64, h064 = hv.double(), h0.double()
    h0b = h064.expand(B, Le, H)
    g = cos(h64, h064[src]) if gene_shifts or (pooling == "mean" and cell_readout == "genes") else None
    if pooling == "cls":
        cs = cos(h64[:, 0], h064[0].expand(B, H))
    elif cell_readout == "genes":
        w = valid_v.double()
        cs = (g * w).sum(1) / w.sum(1)
    else:
        cs = cos(mean_rows(h64, valid_v), mean_rows(h0b, valid_o))
    res = BlockResult(cs.cpu().numpy())
    if target is not None:
        if pooling == "cls":
            pv, po = h64[:, 0], h064[0].expand(B, H)
        elif state_shift == "all":  # every gene of each cell, the moved/perturbed/inserted ones included
            pv, po = mean_rows(h64, ~spec_e[src]), mean_rows(h0b, orig_all)
        else:
            pv, po = mean_rows(h64, valid_v), mean_rows(h0b, valid_o)
        t = target.double().reshape(-1, H)
        res.target_shift = (cos(pv[:, None], t[None]) - cos(po[:, None], t[None])).cpu().numpy()
    if gene_shifts:
        ids = torch.as_tensor(np.concatenate([plan.input_ids, block.inserted]), device=dev)[src]
        vv = valid_v.cpu().numpy()
        gn, ids = g.cpu().numpy(), ids.cpu().numpy()
        res.gene_tokens = [ids[b][vv[b]].astype(np.int32) for b in range(B)]
        res.gene_cos = [gn[b][vv[b]].astype(np.float32) for b in range(B)]
    return res


def concat_results(parts: list[BlockResult]) -> BlockResult:
    out = BlockResult(np.concatenate([p.cos_sim for p in parts]))
    if parts[0].target_shift is not None:
        out.target_shift = np.concatenate([p.target_shift for p in parts])
    if parts[0].gene_tokens is not None:
        out.gene_tokens = [g for p in parts for g in p.gene_tokens]
        out.gene_cos = [g for p in parts for g in p.gene_cos]
    return out


class ExactEngine:
    """Batched exact engine over one model (see the module docstring).

    Parameters
    ----------
    model
        A ``BertEncoderModel`` already on ``device``.
    n_layers
        Layers to run (the readout layer, from ``model.resolve_layer``).
    device, dtype
        Compute device; ``dtype`` bf16/fp16 runs under autocast (readouts always in fp32/fp64).
    batch_tokens
        Token budget of one batched forward (at least one variant per batch).
    """

    def __init__(self, model: Any, *, n_layers: int, device: torch.device, dtype: torch.dtype | None,
                 batch_tokens: int) -> None:
        self.P = EncoderParams(model)
        self.n_layers = n_layers
        self.device = device
        self.dtype = dtype
        self.batch_tokens = batch_tokens

    @torch.no_grad()
    def unperturbed(self, ids: torch.Tensor) -> torch.Tensor:
        """Readout-layer states ``(L, H)`` (fp32) of the unperturbed cell."""
        with autocast_ctx(self.device, self.dtype):
            h = self.P.embed(ids[None], torch.arange(ids.shape[0], device=self.device)[None])
            h = self.P.run(h, self.n_layers)
        return h[0].float()

    def embed_sources(self, plan: CellPlan, block: VariantBlock | None, sources: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
        """Embedding rows of source positions ``sources`` (the cell's, then ``block``'s inserted genes)
        placed at variant positions ``positions``; the per-family hook (:mod:`.genecompass` overrides it)."""
        ins = block.inserted if block is not None else np.zeros(0, dtype=np.int64)
        ids = torch.as_tensor(np.concatenate([plan.input_ids, ins]), device=self.device)
        return self.P.embed(ids[sources], positions.clamp(0, self.P.max_pos - 1))

    def tail_rows(self, plan: CellPlan, length: int) -> torch.Tensor | None:
        """Embedding rows appended to every variant of ``length`` rows (pads that attend), or ``None``."""
        return None

    @torch.no_grad()
    def run_block(self, plan: CellPlan, block: VariantBlock, h0: torch.Tensor, *, pooling: str,
                  gene_shifts: bool, target: torch.Tensor | None, cell_readout: str = "genes",
                  state_shift: str = "all", on_batch: Callable[[int], None] | None = None) -> BlockResult:
        P, dev = self.P, self.device
        # inserted genes are extra source positions L.. (see plan.build_insertion)
        L = len(plan.input_ids) + len(block.inserted)
        flat, offs, xs, xo = embedding_index(block.src, L)
        with autocast_ctx(dev, self.dtype):
            ar = torch.arange(L, device=dev)
            tabs = [self.embed_sources(plan, block, ar, ar + int(o)) for o in offs]
            if len(xs):
                xs_t = torch.as_tensor(xs, device=dev)
                tabs.append(self.embed_sources(plan, block, xs_t, xs_t + torch.as_tensor(xo, device=dev)))
            tail = self.tail_rows(plan, block.length)
            if tail is not None:
                tabs.append(tail)
            emb = torch.cat(tabs) if len(tabs) > 1 else tabs[0]
            qkv = P.qkv(0, emb) if self.n_layers > 0 else None
        flat_t = torch.as_tensor(flat, device=dev)
        if tail is not None:  # the same rows (the last of the tables) after every variant of this length
            n_tail = tail.shape[0]
            rows = torch.arange(emb.shape[0] - n_tail, emb.shape[0], device=dev)
            flat_t = torch.cat([flat_t, rows.expand(flat_t.shape[0], n_tail)], 1)
        # a <cls> readout without per-gene shifts needs only row 0 of the last layer
        cls_only = pooling == "cls" and not gene_shifts
        per = max(1, self.batch_tokens // flat_t.shape[1])
        parts = []
        for b0 in range(0, block.n_variants, per):
            b1 = min(b0 + per, block.n_variants)
            idx = flat_t[b0:b1]
            with autocast_ctx(dev, self.dtype):
                h = emb[idx]
                for i in range(self.n_layers):
                    pre = qkv[idx] if i == 0 else None
                    if i == self.n_layers - 1 and cls_only:
                        h = P.layer_first_row(i, h, pre)
                    else:
                        h = P.layer(i, h, pre)
            parts.append(readout(h0, h[:, :block.length].float(), plan, block, slice(b0, b1), pooling=pooling,
                                 gene_shifts=gene_shifts, target=target, cell_readout=cell_readout,
                                 state_shift=state_shift))
            if on_batch is not None:
                on_batch(b1 - b0)
        return concat_results(parts)
