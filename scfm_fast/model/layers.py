"""BERT layer maths, once: embeddings, Q/K/V, attention (through :mod:`scfm_fast.kernels.attention`),
output projection + residual LayerNorm, feed-forward.

:class:`EncoderParams` holds views of a :class:`~scfm_fast.model.bert.BertEncoderModel`'s weights (Q/K/V
fused into one projection) and computes every layout from them: cells of one length (the perturbation
engines), packed varlen batches (embeddings, training) and padded batches with a mask (the reference
path, equal to Hugging Face ``BertModel``'s eager attention). Dropout sits where HF BERT puts it and is
active only when the model was in train mode at construction.

Precision: under autocast the residual stream stays float32 (a half-precision projection plus a float32
residual sums in float32, as eager HF BERT under autocast); inputs are never cast down here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..kernels.activations import get_activation
from ..kernels.attention import dense_attention, key_padding_bias, padded_attention_ref, varlen_attention
from ..kernels.bias_act import bias_act
from ..kernels.embeddings import bert_embeddings
from ..kernels.layer_norm import add_layer_norm

LN = tuple[torch.Tensor, torch.Tensor, float]


@dataclass
class LayerParams:
    """One encoder layer's weights; ``wqkv``/``bqkv`` are query, key and value stacked."""

    wqkv: torch.Tensor
    bqkv: torch.Tensor
    wo: torch.Tensor
    bo: torch.Tensor
    ln1: LN
    wi: torch.Tensor
    bi: torch.Tensor
    wo2: torch.Tensor
    bo2: torch.Tensor
    ln2: LN


class EncoderParams:
    """The encoder layers' maths on a ``BertEncoderModel``'s weights.

    Parameters
    ----------
    model
        A :class:`~scfm_fast.model.bert.BertEncoderModel` (or a model with the same module names).
    fused
        Use the fused row kernels (embedding + LayerNorm, bias + activation, residual + LayerNorm), which
        run Triton on CUDA and plain PyTorch elsewhere. ``False`` (default) uses plain PyTorch ops with
        in-place updates of fresh temporaries (the perturbation engines' numerics).

    Notes
    -----
    Fused Q/K/V weights are concatenated here; build a new instance after the weights change (training
    builds one per forward, so gradients flow through the concatenation to the parameters).
    """

    def __init__(self, model: Any, *, fused: bool = False) -> None:
        cfg = model.config
        self.hidden = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.max_pos = cfg.max_position_embeddings
        self.pad_id = cfg.pad_token_id
        self.act_name = cfg.hidden_act
        self._activation = get_activation(cfg.hidden_act)
        self.act = self._activation.fn
        self.fused = fused
        # dropout as HF BERT: only in train mode; eval results do not depend on the probabilities
        self.p_hidden = float(cfg.hidden_dropout_prob) if model.training else 0.0
        self.p_attn = float(cfg.attention_probs_dropout_prob) if model.training else 0.0
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

    # ------------------------------------------------------------------ row-wise pieces
    def _ln(self, x: torch.Tensor, p: LN) -> torch.Tensor:
        return F.layer_norm(x, (self.hidden,), p[0], p[1], p[2])

    def _residual_ln(self, x: torch.Tensor, res: torch.Tensor, p: LN) -> torch.Tensor:
        """``LayerNorm(x + res)``; ``x`` is a fresh temporary."""
        if self.fused:
            return add_layer_norm(x, res, p[0], p[1], p[2])
        return self._ln(_add(x, res), p)

    def _drop(self, x: torch.Tensor, p: float) -> torch.Tensor:
        return F.dropout(x, p) if p > 0 else x

    def _act_(self, x: torch.Tensor) -> torch.Tensor:
        """The activation, in place where torch has an in-place form and autograd does not record."""
        inplace = self._activation.inplace
        if inplace is not None and not _records(x):
            return inplace(x)
        return self.act(x)

    def embed(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Embedding output rows for token ids ``tok`` at positions ``pos`` (any matching shapes)."""
        if self.fused:
            h = bert_embeddings(tok.reshape(-1), pos.reshape(-1), self.word, self.pos, self.tt0, *self.eln)
            h = h.view(*tok.shape, self.hidden)
        else:
            # padding_idx: padded rows give the pad embedding no gradient, as nn.Embedding in HF BERT
            h = self._ln(F.embedding(tok, self.word, self.pad_id) + self.pos[pos] + self.tt0, self.eln)
        return self._drop(h, self.p_hidden)

    def qkv(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Layer ``i``'s queries, keys and values side by side, ``(..., 3H)``."""
        lp = self.layers[i]
        return F.linear(h, lp.wqkv, lp.bqkv)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., T, H)`` -> ``(..., nh, T, hd)``."""
        *lead, T, _ = x.shape
        return x.view(*lead, T, self.n_heads, self.head_dim).transpose(-3, -2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., nh, T, hd)`` -> ``(..., T, H)``."""
        *lead, nh, T, hd = x.shape
        return x.transpose(-3, -2).reshape(*lead, T, nh * hd)

    def ffn(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Feed-forward of layer ``i`` before its residual: ``W2 act(W1 h + b1) + b2`` (dropout applied)."""
        lp = self.layers[i]
        if self.fused:
            inter = bias_act(F.linear(h, lp.wi), lp.bi, self.act_name)
        else:
            inter = self._act_(F.linear(h, lp.wi, lp.bi))
        return self._drop(F.linear(inter, lp.wo2, lp.bo2), self.p_hidden)

    def post_attention(self, i: int, ctx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Output projection + residual LayerNorm + feed-forward of layer ``i`` given the attention context."""
        # in place on fresh temporaries (inference): at these sizes the CPU spends as long allocating
        # (page faults) as computing an elementwise op
        lp = self.layers[i]
        h = self._residual_ln(self._drop(F.linear(ctx, lp.wo, lp.bo), self.p_hidden), h, lp.ln1)
        return self._residual_ln(self.ffn(i, h), h, lp.ln2)

    # ------------------------------------------------------------------ cells of one length
    def layer(self, i: int, h: torch.Tensor, qkv: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder layer ``i`` on an unpadded batch ``(B, T, H)`` (``qkv`` precomputed if given)."""
        if qkv is None:
            qkv = self.qkv(i, h)
        q, k, v = (self.split_heads(t) for t in qkv.chunk(3, dim=-1))
        ctx = self.merge_heads(dense_attention(q, k, v, dropout_p=self.p_attn))
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
        ctx = self.merge_heads(dense_attention(q, k, v, dropout_p=self.p_attn))
        return self.post_attention(i, ctx, h[:, :1])

    def run(self, h: torch.Tensor, n_layers: int) -> torch.Tensor:
        """The first ``n_layers`` layers on cells of one length ``(B, T, H)``."""
        for i in range(n_layers):
            h = self.layer(i, h)
        return h

    # ------------------------------------------------------------------ packed (varlen) cells
    def layer_varlen(self, i: int, h: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, *,
                     attn_backend: str = "auto") -> torch.Tensor:
        """Encoder layer ``i`` on packed rows ``(total, H)`` of the cells ``cu_seqlens`` delimits."""
        qkv = self.qkv(i, h).view(-1, 3, self.n_heads, self.head_dim)
        # unbind, not three selects: its backward is one stack, not three zero-filled copies and two adds
        q, k, v = (t.contiguous() for t in qkv.unbind(1))
        ctx = varlen_attention(q, k, v, cu_seqlens, max_seqlen, backend=attn_backend, dropout_p=self.p_attn)
        return self.post_attention(i, ctx.reshape(-1, self.hidden), h)

    def run_varlen(self, h: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, *, n_layers: int,
                   attn_backend: str = "auto") -> torch.Tensor:
        """The first ``n_layers`` layers on packed rows."""
        for i in range(n_layers):
            h = self.layer_varlen(i, h, cu_seqlens, max_seqlen, attn_backend=attn_backend)
        return h

    # ------------------------------------------------------------------ padded cells + mask (reference)
    def layer_padded(self, i: int, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Encoder layer ``i`` on padded ``(B, L, H)`` with an additive key bias (HF eager attention)."""
        q, k, v = (self.split_heads(t) for t in self.qkv(i, h).chunk(3, dim=-1))
        ctx = self.merge_heads(padded_attention_ref(q, k, v, bias, dropout_p=self.p_attn))
        return self.post_attention(i, ctx, h)

    def run_padded(self, h: torch.Tensor, attention_mask: torch.Tensor, *, n_layers: int) -> torch.Tensor:
        """The first ``n_layers`` layers on padded rows; ``attention_mask`` ``(B, L)`` is 1 on real rows."""
        bias = key_padding_bias(attention_mask, h.dtype)
        for i in range(n_layers):
            h = self.layer_padded(i, h, bias)
        return h


def _records(x: torch.Tensor) -> bool:
    """Autograd records operations on ``x`` (so in-place updates could break its backward)."""
    return torch.is_grad_enabled() and x.requires_grad


def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b``, in place on the temporary ``a`` when that keeps the dtype of the sum (under autocast
    ``a`` is half precision and ``b`` float32: then the sum must stay float32) and autograd does not
    record ``a``."""
    if a.dtype == torch.promote_types(a.dtype, b.dtype) and not _records(a):
        return a.add_(b)
    return a + b


def autocast_ctx(device: torch.device, dtype: torch.dtype | None):
    """Autocast for bf16/fp16 compute; a no-op for fp32."""
    if dtype is None or dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)
