"""Fused BERT embeddings: ``LayerNorm(word[ids] + position[pos] + token_type[0])`` on packed rows.

Reference: :func:`embeddings_ref` (three ``index_select`` s, a sum and ``F.layer_norm``), which is HF
``BertEmbeddings`` with all token types 0 (Geneformer). One Triton program gathers and normalises one
row; inference only (no backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # a Linux dependency; without it the PyTorch ops below are used
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None

from ._utils import row_block, run_kernel, use_triton


def embeddings_ref(input_ids: torch.Tensor, position_ids: torch.Tensor, word: torch.Tensor, pos: torch.Tensor,
                   type0: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """PyTorch reference on packed ``(total,)`` ids and positions."""
    h = word.index_select(0, input_ids).float() + pos.index_select(0, position_ids).float() + type0.float()
    return F.layer_norm(h, (word.shape[1],), weight.float(), bias.float(), eps).to(word.dtype)


if triton is not None:

    @triton.jit
    def _embed_ln_fwd(IDS, POS, WORD, PE, T0, W, B, Y, stride_w, stride_p, stride_y, N, eps,
                      BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: rows * stride can pass 2**31
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        tok = tl.load(IDS + row).to(tl.int64)
        p = tl.load(POS + row).to(tl.int64)
        h = tl.load(WORD + tok * stride_w + cols, mask=mask, other=0.0).to(tl.float32)
        h += tl.load(PE + p * stride_p + cols, mask=mask, other=0.0).to(tl.float32)
        h += tl.load(T0 + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(h, axis=0) / N
        hc = tl.where(mask, h - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(hc * hc, axis=0) / N + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (hc * rstd * w + b).to(Y.dtype.element_ty), mask=mask)


def _kernel():
    return _embed_ln_fwd


def embeddings_forward(input_ids, position_ids, word, pos, type0, weight, bias, eps):
    """Launch the Triton kernel; returns ``(total, hidden)`` in the embedding dtype."""
    n = word.shape[1]
    if input_ids.shape != position_ids.shape:
        msg = f"input_ids {tuple(input_ids.shape)} and position_ids {tuple(position_ids.shape)} differ"
        raise ValueError(msg)
    if input_ids.numel():
        # the kernel gathers rows unchecked: an out-of-range id or position would read past the table
        lo, hi, pmax = torch.stack([input_ids.min(), input_ids.max(), position_ids.max()]).tolist()
        if pmax >= pos.shape[0]:
            msg = (f"a cell has {pmax + 1} tokens but the model has only {pos.shape[0]} "
                   "positions; tokenize with this model's max length")
            raise ValueError(msg)
        if lo < 0 or hi >= word.shape[0]:
            msg = (f"token ids range over [{lo}, {hi}] but the model's vocabulary has {word.shape[0]} tokens; "
                   "tokenize with this model's token dictionary")
            raise ValueError(msg)
    y = torch.empty(input_ids.numel(), n, dtype=word.dtype, device=word.device)
    if input_ids.numel():
        block, warps = row_block(n)
        _kernel()[(input_ids.numel(),)](input_ids.contiguous(), position_ids.contiguous(), word, pos,
                                        type0.contiguous(), weight.contiguous(), bias.contiguous(), y,
                                        word.stride(0), pos.stride(0), y.stride(0), n, eps, BLOCK=block,
                                        num_warps=warps)
    return y


def bert_embeddings(input_ids, position_ids, word, pos, type0, weight, bias, eps):
    """Embedding sum + LayerNorm: Triton on CUDA (or under the interpreter), PyTorch otherwise."""
    def torch_ops() -> torch.Tensor:
        h = F.embedding(input_ids, word) + F.embedding(position_ids, pos) + type0
        return F.layer_norm(h, (word.shape[1],), weight, bias, eps)

    if use_triton(word) and not torch.is_grad_enabled():
        return run_kernel("bert_embeddings",
                          lambda: embeddings_forward(input_ids, position_ids, word, pos, type0, weight, bias, eps),
                          torch_ops)
    return torch_ops()
