"""Our FlashAttention-style varlen forward kernel in Triton (see :mod:`scfm_fast.kernels.attention`).

Online softmax over key blocks, one program per (sequence, head, query block). Forward only: the
dispatcher never picks it when a gradient is needed, and refuses it by name.
"""

from __future__ import annotations

import math
import os

import torch

try:  # a Linux dependency; without it the other backends are used
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None

from ._utils import interpreting, next_pow2

_LOG2E = 1.4426950408889634


if triton is not None:

    @triton.jit
    def _varlen_attn_fwd(Q, K, V, Out, CU, qk_scale, stride_t, stride_h, H, D,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         IEEE: tl.constexpr):
        # (sequence, head) on axis 0: its limit is 2**31, axis 1 only allows 65,535 programs
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        start = tl.load(CU + b).to(tl.int64)  # 64-bit row offsets: token * stride can pass 2**31
        seqlen = (tl.load(CU + b + 1) - tl.load(CU + b)).to(tl.int32)
        if pid_m * BLOCK_M < seqlen:
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = tl.arange(0, BLOCK_N)
            offs_d = tl.arange(0, BLOCK_D)
            dmask = offs_d[None, :] < D
            q = tl.load(Q + (start + offs_m)[:, None] * stride_t + h * stride_h + offs_d[None, :],
                        mask=(offs_m[:, None] < seqlen) & dmask, other=0.0)
            m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
            l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
            acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            for n0 in range(0, seqlen, BLOCK_N):
                kn = n0 + offs_n
                kv_mask = (kn[:, None] < seqlen) & dmask
                kv_off = (start + kn)[:, None] * stride_t + h * stride_h + offs_d[None, :]
                k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
                # float32 inputs: exact fp32 products, as the reference (Triton's default is TF32 on
                # CUDA, ~3e-4 relative error); half inputs use the tensor cores either way
                # scores in log2 units (qk_scale = scale * log2(e)): exp2 is the hardware's native exponential
                if IEEE:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
                else:
                    s = tl.dot(q, tl.trans(k)) * qk_scale
                s = tl.where(kn[None, :] < seqlen, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                p = tl.exp2(s - m_new[:, None])
                alpha = tl.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
                if IEEE:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new
            acc = acc / l_i[:, None]
            tl.store(Out + (start + offs_m)[:, None] * stride_t + h * stride_h + offs_d[None, :],
                     acc.to(Out.dtype.element_ty), mask=(offs_m[:, None] < seqlen) & dmask)


    # CUDA: block shapes, warps and pipelining depth chosen by timing on the first call per (heads, head
    # dim, precision). Configurations that do not fit the device are skipped by the autotuner.
    _CUDA_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                     for bm, bn, w, s in ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3),
                                          (64, 64, 4, 4), (128, 32, 4, 4), (64, 32, 4, 3))]
    _varlen_attn_fwd_tuned = triton.autotune(configs=_CUDA_CONFIGS, key=["H", "BLOCK_D", "IEEE"])(_varlen_attn_fwd)


def varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen, *, scale=None):
    """Launch the Triton varlen forward kernel (see module docstring).

    On CUDA the block configuration is autotuned (``SCFM_FAST_TRITON_AUTOTUNE=0``: a fixed 64 x 64);
    under the CPU interpreter it is 16 x 16.
    """
    total, nh, hd = q.shape
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    if total == 0:
        return out
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    block_d = max(16, next_pow2(hd))
    batch = cu_seqlens.numel() - 1
    lmax = max(int(max_seqlen), 1)
    args = (q, k, v, out, cu_seqlens.to(torch.int32), scale * _LOG2E, q.stride(0), q.stride(1), nh, hd)
    ieee = q.dtype == torch.float32
    if q.is_cuda and os.environ.get("SCFM_FAST_TRITON_AUTOTUNE", "1") != "0":
        grid = lambda meta: (batch * nh, triton.cdiv(lmax, meta["BLOCK_M"]))  # noqa: E731
        _varlen_attn_fwd_tuned[grid](*args, BLOCK_D=block_d, IEEE=ieee)
        return out
    block = 16 if interpreting() else (64 if block_d <= 64 else 32)
    _varlen_attn_fwd[(batch * nh, triton.cdiv(lmax, block))](*args, BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d,
                                                             IEEE=ieee)
    return out


