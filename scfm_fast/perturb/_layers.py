"""Encoder maths for the perturbation engines, from a ``BertEncoderModel``'s parameters.

Plain torch ops + ``scaled_dot_product_attention``: all variants of a cell have one length, so a batch
needs no padding and no mask. Same operations, in the same order, as ``forward_reference``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class LayerParams:
    wqkv: torch.Tensor
    bqkv: torch.Tensor
    wo: torch.Tensor
    bo: torch.Tensor
    ln1: tuple[torch.Tensor, torch.Tensor, float]
    wi: torch.Tensor
    bi: torch.Tensor
    wo2: torch.Tensor
    bo2: torch.Tensor
    ln2: tuple[torch.Tensor, torch.Tensor, float]


class EncoderParams:
    """Views of a ``BertEncoderModel``'s weights (Q/K/V fused into one projection)."""

    def __init__(self, model: Any) -> None:
        cfg = model.config
        self.hidden = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.max_pos = cfg.max_position_embeddings
        self.act = model.act
        e = model.embeddings
        self.word = e.word_embeddings.weight
        self.pos = e.position_embeddings.weight
        self.tt0 = e.token_type_embeddings.weight[0]
        self.eln = (e.LayerNorm.weight, e.LayerNorm.bias, e.LayerNorm.eps)
        self.layers: list[LayerParams] = []
        for lyr in model.encoder.layer:
            sa, ao = lyr.attention.self, lyr.attention.output
            self.layers.append(LayerParams(
                torch.cat([sa.query.weight, sa.key.weight, sa.value.weight]),
                torch.cat([sa.query.bias, sa.key.bias, sa.value.bias]),
                ao.dense.weight, ao.dense.bias, (ao.LayerNorm.weight, ao.LayerNorm.bias, ao.LayerNorm.eps),
                lyr.intermediate.dense.weight, lyr.intermediate.dense.bias,
                lyr.output.dense.weight, lyr.output.dense.bias,
                (lyr.output.LayerNorm.weight, lyr.output.LayerNorm.bias, lyr.output.LayerNorm.eps)))

    def _ln(self, x: torch.Tensor, p: tuple[torch.Tensor, torch.Tensor, float]) -> torch.Tensor:
        return F.layer_norm(x, (self.hidden,), p[0], p[1], p[2])

    def embed(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Embedding output rows for token ids ``tok`` at positions ``pos`` (any matching shapes)."""
        return self._ln(self.word[tok] + self.pos[pos] + self.tt0, self.eln)

    def qkv(self, i: int, h: torch.Tensor) -> torch.Tensor:
        lp = self.layers[i]
        return F.linear(h, lp.wqkv, lp.bqkv)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., T, H)`` -> ``(..., nh, T, hd)``."""
        *lead, T, _ = x.shape
        return x.view(*lead, T, self.n_heads, self.head_dim).transpose(-3, -2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        *lead, nh, T, hd = x.shape
        return x.transpose(-3, -2).reshape(*lead, T, nh * hd)

    def _act_(self, x: torch.Tensor) -> torch.Tensor:
        """The activation, in place where torch has an in-place form (``x`` is a fresh temporary)."""
        if self.act is F.relu:
            return x.relu_()
        if self.act is F.silu:
            return F.silu(x, inplace=True)
        return self.act(x)

    def post_attention(self, i: int, ctx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Output projection + residual LayerNorm + feed-forward of layer ``i`` given the attention context."""
        # the same operations as forward_reference; in-place on fresh temporaries, because at these sizes
        # the CPU spends as long allocating (page faults) as computing an elementwise op
        lp = self.layers[i]
        h = self._ln(_add(F.linear(ctx, lp.wo, lp.bo), h), lp.ln1)
        ff = F.linear(self._act_(F.linear(h, lp.wi, lp.bi)), lp.wo2, lp.bo2)
        return self._ln(_add(ff, h), lp.ln2)

    def layer(self, i: int, h: torch.Tensor, qkv: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder layer ``i`` on an unpadded batch ``(B, T, H)`` (``qkv`` precomputed if given)."""
        if qkv is None:
            qkv = self.qkv(i, h)
        q, k, v = (self.split_heads(t) for t in qkv.chunk(3, dim=-1))
        ctx = self.merge_heads(F.scaled_dot_product_attention(q, k, v))
        return self.post_attention(i, ctx, h)

    def layer_first_row(self, i: int, h: torch.Tensor, qkv: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder layer ``i``'s output at row 0 only, ``(B, 1, H)``: all a ``<cls>`` readout needs from
        its last layer. Keys and values of every row, the query, attention and feed-forward of row 0."""
        lp, H = self.layers[i], self.hidden
        if qkv is None:
            q = F.linear(h[:, :1], lp.wqkv[:H], lp.bqkv[:H])
            k, v = F.linear(h, lp.wqkv[H:], lp.bqkv[H:]).chunk(2, dim=-1)
        else:
            q, k, v = qkv[:, :1, :H], qkv[..., H:2 * H], qkv[..., 2 * H:]
        q, k, v = (self.split_heads(t) for t in (q, k, v))
        ctx = self.merge_heads(F.scaled_dot_product_attention(q, k, v))
        return self.post_attention(i, ctx, h[:, :1])

    def run(self, h: torch.Tensor, n_layers: int) -> torch.Tensor:
        for i in range(n_layers):
            h = self.layer(i, h)
        return h


def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b``, in place on the temporary ``a`` when that keeps the dtype of the sum (under autocast
    ``a`` is half precision and ``b`` float32: then the sum must stay float32, as in forward_reference)."""
    return a.add_(b) if a.dtype == torch.promote_types(a.dtype, b.dtype) else a + b


def autocast_ctx(device: torch.device, dtype: torch.dtype | None):
    """Autocast for bf16/fp16 compute; a no-op for fp32."""
    if dtype is None or dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)
