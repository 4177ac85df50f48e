"""Segment pooling over packed sequences: mean over each cell's rows (excluding special tokens) or
its first row (``<cls>``).

Reference: :func:`segment_mean_ref` (``index_add`` of kept rows divided by their count). The Triton
kernel runs one program per (cell, block of hidden units) and loops over the cell's rows; an empty
selection gives NaN, so a cell without genes is visible rather than silently zero.
"""

from __future__ import annotations

import torch

try:  # a Linux dependency; without it the PyTorch ops below are used
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None

from ._utils import next_pow2, run_kernel, use_triton


def segment_mean_ref(x: torch.Tensor, cu_seqlens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``x`` rows per segment, over rows where ``keep`` is true; float32 result."""
    from .padding import seq_ids_from_cu_seqlens

    b = cu_seqlens.numel() - 1
    seq = seq_ids_from_cu_seqlens(cu_seqlens, x.shape[0])
    w = torch.ones(x.shape[0], device=x.device) if keep is None else keep.float()
    sums = torch.zeros(b, x.shape[1], device=x.device, dtype=torch.float32).index_add_(0, seq, x.float() * w[:, None])
    cnt = torch.zeros(b, device=x.device, dtype=torch.float32).index_add_(0, seq, w)
    return sums / cnt[:, None]


if triton is not None:

    @triton.jit
    def _segment_mean(X, KEEP, CU, Y, stride_x, stride_y, N, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        seq = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        start = tl.load(CU + seq)
        end = tl.load(CU + seq + 1)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        cnt = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for r0 in range(start, end, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            rmask = rows < end
            k = tl.load(KEEP + rows, mask=rmask, other=0).to(tl.float32)
            x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(x * k[:, None], axis=0)
            cnt += k
        total = tl.sum(cnt, axis=0)
        tl.store(Y + seq * stride_y + cols, acc / total, mask=cmask)


def _kernel():
    return _segment_mean


def segment_mean_forward(x: torch.Tensor, cu_seqlens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the Triton kernel; returns ``(B, hidden)`` float32."""
    b, n = cu_seqlens.numel() - 1, x.shape[1]
    x = x.contiguous()
    keep = torch.ones(x.shape[0], dtype=torch.int8, device=x.device) if keep is None else keep.to(torch.int8)
    y = torch.empty(b, n, dtype=torch.float32, device=x.device)
    if b:
        block_n = min(max(next_pow2(n), 16), 256)
        _kernel()[(b, triton.cdiv(n, block_n))](x, keep.contiguous(), cu_seqlens.to(torch.int32), y, x.stride(0),
                                                y.stride(0), n, BLOCK_N=block_n, BLOCK_R=16)
    return y


def segment_mean(x: torch.Tensor, cu_seqlens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per-cell mean over kept rows: Triton on CUDA (or under the interpreter), PyTorch otherwise."""
    if use_triton(x) and not torch.is_grad_enabled():
        return run_kernel("segment_mean", lambda: segment_mean_forward(x, cu_seqlens, keep),
                          lambda: segment_mean_ref(x, cu_seqlens, keep))
    return segment_mean_ref(x, cu_seqlens, keep)


def first_token(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Each cell's first row (``<cls>`` pooling), float32."""
    return x.index_select(0, cu_seqlens[:-1].to(torch.int64)).float()
