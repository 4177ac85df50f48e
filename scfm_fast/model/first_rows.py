"""One encoder layer's output at each packed cell's first row only (a ``<cls>`` / species-row readout).

A cell embedding read off the first row needs, from the last layer, every row's keys and values but only
the first row's query, attention and feed-forward: the other rows' share of that layer (most of its
matrix products) is skipped. Attention of one query per cell is a softmax over the cell's rows, done
here with segment reductions over the packed rows (no padding, no per-cell loop).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.padding import seq_ids_from_cu_seqlens
from .layers import EncoderParams


def layer_varlen_first_rows(params: EncoderParams, i: int, h: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Layer ``i``'s output ``(B, H)`` at the first row of each cell of the packed ``h`` ``(rows, H)``.

    Equals ``params.layer_varlen(i, h, ...)[cu_seqlens[:-1]]`` (inference: no dropout).
    """
    if params.p_attn > 0 or params.p_hidden > 0:
        msg = "first-row readout is for inference: put the model in eval mode (no dropout)"
        raise ValueError(msg)
    lp, hid, nh, hd = params.layers[i], params.hidden, params.n_heads, params.head_dim
    cu = cu_seqlens.long()
    first, n = cu[:-1], cu.numel() - 1
    q = F.linear(h[first], lp.wqkv[:hid], lp.bqkv[:hid]).view(n, nh, hd)
    k, v = F.linear(h, lp.wqkv[hid:], lp.bqkv[hid:]).view(-1, 2, nh, hd).unbind(1)
    seq = seq_ids_from_cu_seqlens(cu, h.shape[0])
    # softmax statistics in float32 (as SDPA accumulates), also under autocast
    s = (k.float() * q.float()[seq]).sum(-1) * hd ** -0.5  # (rows, heads)
    top = s.new_full((n, nh), float("-inf")).scatter_reduce_(0, seq[:, None].expand_as(s), s, "amax")
    p = (s - top[seq]).exp_()
    den = s.new_zeros(n, nh).index_add_(0, seq, p)
    ctx = s.new_zeros(n, nh, hd).index_add_(0, seq, p[..., None] * v.float()) / den[..., None]
    return params.post_attention(i, ctx.to(h.dtype).reshape(n, hid), h[first])
