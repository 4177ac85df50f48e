"""Variable-length (unpadded) multi-head attention with backend dispatch.

Inputs follow flash-attn's varlen API: ``q, k, v`` of shape ``(total, heads, head_dim)`` holding the
rows of ``B`` sequences back to back, ``cu_seqlens`` ``int32 (B+1,)`` and ``max_seqlen``. Attention is
bidirectional (BERT) and never crosses sequences.

Backends, tried in this order by ``backend="auto"`` (the first that supports the inputs wins):

``flash``
    ``flash_attn.flash_attn_varlen_func`` (CUDA, fp16/bf16, head_dim <= 256 and a multiple of 8).
``sdpa``
    ``torch.nn.functional.scaled_dot_product_attention``: on CUDA over nested (jagged) tensors, which
    PyTorch runs with its varlen flash / memory-efficient kernels (padded length buckets if that fails);
    on the CPU one unmasked call per cell (so its fused kernel is used).
``triton``
    :func:`_varlen_attn_fwd` below, our FlashAttention-style forward kernel (online softmax over
    key blocks, one program per (query block, sequence, head)); CUDA, or the CPU under
    ``TRITON_INTERPRET=1``. Forward only (inference / embeddings / perturbation).
``reference``
    :func:`varlen_attention_ref`, plain PyTorch per sequence in float32: the oracle.

:func:`backend_report` lists, for a device and dtype, which backends are usable and why the others
are not (printed by ``scfm info``).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

try:  # a Linux dependency; without it the other backends are used
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None

from ._utils import interpreting, next_pow2, triton_available

log = logging.getLogger("scfm_fast")

BACKENDS = ("flash", "sdpa", "triton", "reference")
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- reference
def varlen_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         max_seqlen: int | None = None, *, scale: float | None = None) -> torch.Tensor:
    """Softmax(q k^T * scale) v for each sequence separately, in float32 (the oracle)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.empty_like(q)
    cu = cu_seqlens.tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        if e == s:
            continue
        qs, ks, vs = (t[s:e].float().transpose(0, 1) for t in (q, k, v))  # (H, L, D)
        p = torch.softmax(qs @ ks.transpose(-1, -2) * scale, dim=-1)
        out[s:e] = (p @ vs).transpose(0, 1).to(q.dtype)
    return out


# ----------------------------------------------------------------------------- sdpa
_nested_failed: list[str] = []


def _sdpa_nested(q, k, v, cu_seqlens, max_seqlen, *, scale):
    """SDPA over nested (jagged) tensors built on ``cu_seqlens``: on CUDA, PyTorch hands these to its
    own varlen flash / memory-efficient kernels, with no padding and no mask."""
    off = cu_seqlens.to(torch.int64)

    def nt(t):
        return torch.nested.nested_tensor_from_jagged(t, off, max_seqlen=int(max_seqlen)).transpose(1, 2)

    if q.is_cuda:
        # fused kernels only: if neither applies, raise (the caller falls back to padded buckets) rather
        # than let SDPA run its slow math path one sequence at a time
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            o = F.scaled_dot_product_attention(nt(q), nt(k), nt(v), scale=scale)
    else:  # the CPU runs nested tensors through the math path: used by tests only
        o = F.scaled_dot_product_attention(nt(q), nt(k), nt(v), scale=scale)
    return o.transpose(1, 2).values().reshape(q.shape)


def _sdpa_varlen(q, k, v, cu_seqlens, max_seqlen, *, scale, layout=None):
    """Varlen attention through ``torch.nn.functional.scaled_dot_product_attention``.

    ``layout`` (default: ``"per_cell"`` on the CPU, ``"nested"`` on CUDA):

    ``per_cell``
        One unmasked call per cell (the CPU's fused kernel; a mask would force the math path, which
        materialises L x L scores; per-call overhead is negligible at these lengths).
    ``nested``
        Nested (jagged) tensors: PyTorch's varlen kernels. Falls back to ``bucketed`` (logged once) if
        this PyTorch build cannot run them.
    ``bucketed``
        Pad to ``(B, H, L, D)`` with a key-padding mask, sequences grouped into buckets of similar length
        (at most 2x apart) so padding waste stays bounded; a bucket of one length runs unmasked.
    """
    from .padding import position_ids_from_cu_seqlens, seq_ids_from_cu_seqlens

    total, nh, hd = q.shape
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    out = torch.empty_like(q)
    if total == 0:
        return out
    layout = layout or ("per_cell" if q.device.type == "cpu" else "nested")
    if layout == "nested" and not _nested_failed:
        try:
            return _sdpa_nested(q, k, v, cu_seqlens, max_seqlen, scale=scale)
        except (RuntimeError, NotImplementedError, TypeError, AttributeError, ValueError) as e:
            _nested_failed.append(f"{type(e).__name__}: {e}")
            log.warning("SDPA on nested tensors failed (%s); using padded buckets", _nested_failed[0][:300])
    if layout == "per_cell":
        cu = cu_seqlens.tolist()
        for s, e in zip(cu[:-1], cu[1:]):
            if e > s:
                o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None],
                                                   v[s:e].transpose(0, 1)[None], scale=scale)
                out[s:e] = o[0].transpose(0, 1)
        return out
    pos = position_ids_from_cu_seqlens(cu_seqlens, total)
    seq = seq_ids_from_cu_seqlens(cu_seqlens, total)
    lens_cpu = lengths.cpu()
    order = torch.argsort(lens_cpu, descending=True, stable=True)
    i = 0
    nb = order.numel()
    while i < nb:
        lmax = int(lens_cpu[order[i]])
        if lmax == 0:
            break
        j = i
        while j < nb and int(lens_cpu[order[j]]) * 2 > lmax:
            j += 1
        group = order[i:j].to(q.device)
        slot = torch.full((lengths.numel(),), -1, dtype=torch.int64, device=q.device)
        slot[group] = torch.arange(group.numel(), device=q.device)
        rows = torch.nonzero(slot[seq] >= 0, as_tuple=False).flatten()
        flat = slot[seq[rows]] * lmax + pos[rows]
        g = group.numel()

        def padded(t, g=g, lmax=lmax, flat=flat, rows=rows):
            buf = t.new_zeros(g * lmax, nh, hd)
            buf[flat] = t[rows]
            return buf.view(g, lmax, nh, hd).transpose(1, 2)

        if rows.numel() == g * lmax:  # every cell of the bucket has length lmax: no mask, fused kernels
            mask = None
        else:
            mask = torch.zeros(g * lmax, dtype=torch.bool, device=q.device)
            mask[flat] = True
            mask = mask.view(g, 1, 1, lmax)
        o = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=mask, scale=scale)
        out[rows] = o.transpose(1, 2).reshape(g * lmax, nh, hd)[flat]
        i = j
    return out


# ----------------------------------------------------------------------------- triton


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


# ----------------------------------------------------------------------------- dispatch
@dataclass
class Backend:
    name: str
    reasons: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return not self.reasons


def _flash_reasons(device: torch.device, dtype: torch.dtype, head_dim: int) -> list[str]:
    r = []
    try:
        import flash_attn  # noqa: F401
    except Exception as e:  # noqa: BLE001
        r.append(f"flash-attn not installed ({type(e).__name__}): pip install scfm_fast[flash]")
    if device.type != "cuda":
        r.append(f"needs a CUDA device, got {device.type}")
    if dtype not in (torch.float16, torch.bfloat16):
        r.append(f"needs fp16/bf16, got {str(dtype).removeprefix('torch.')}")
    if head_dim > 256 or head_dim % 8:
        r.append(f"head_dim {head_dim} must be <= 256 and a multiple of 8")
    return r


def _triton_reasons(device: torch.device, dtype: torch.dtype, head_dim: int) -> list[str]:
    r = []
    why = triton_available()
    if why:
        r.append(why)
    if device.type != "cuda" and not interpreting():
        r.append("needs a CUDA device (or TRITON_INTERPRET=1 on the CPU, for tests)")
    if head_dim > 256:
        r.append(f"head_dim {head_dim} > 256")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        r.append(f"unsupported dtype {dtype}")
    return r


def not_supported_reasons(backend: str, *, device: torch.device | str, dtype: torch.dtype,
                          head_dim: int) -> list[str]:
    """Why ``backend`` cannot run these inputs (empty list: it can)."""
    device = torch.device(device)
    if backend == "flash":
        return _flash_reasons(device, dtype, head_dim)
    if backend == "triton":
        return _triton_reasons(device, dtype, head_dim)
    if backend in ("sdpa", "reference"):
        return []
    return [f"unknown backend {backend!r}; choose from {BACKENDS}"]


def backend_report(device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                   head_dim: int = 64) -> list[dict]:
    """For each backend: name, whether it is usable for (device, dtype, head_dim), and why not."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for b in BACKENDS:
        reasons = not_supported_reasons(b, device=device, dtype=dtype, head_dim=head_dim)
        rows.append({"name": b, "usable": not reasons, "reasons": reasons, "device": str(device),
                     "dtype": str(dtype).removeprefix("torch."), "head_dim": head_dim})
    return rows


_logged: set = set()


def select_backend(q: torch.Tensor, backend: str = "auto") -> str:
    """The backend ``backend`` resolves to for ``q``; raises listing every reason when none fits."""
    cands = BACKENDS if backend == "auto" else (backend,)
    reasons = {}
    for b in cands:
        r = not_supported_reasons(b, device=q.device, dtype=q.dtype, head_dim=q.shape[-1])
        if not r:
            key = (b, q.device.type, q.dtype)
            if key not in _logged:
                _logged.add(key)
                log.info("attention backend: %s (device %s, %s)", b, q.device, q.dtype)
            return b
        reasons[b] = r
    msg = "no attention backend fits: " + "; ".join(f"{b}: {', '.join(r)}" for b, r in reasons.items())
    raise RuntimeError(msg)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, *, scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Bidirectional attention over packed sequences; ``(total, H, D)`` in and out.

    Parameters
    ----------
    q, k, v
        Packed query/key/value rows.
    cu_seqlens
        ``int32 (B+1,)`` sequence boundaries.
    max_seqlen
        Longest sequence.
    scale
        Softmax scale (default ``1/sqrt(head_dim)``).
    backend
        ``"auto"`` or one of ``flash``, ``sdpa``, ``triton``, ``reference``.
    """
    b = select_backend(q, backend)
    if b == "flash":
        from flash_attn import flash_attn_varlen_func

        cu = cu_seqlens.to(torch.int32)
        return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale)
    if b == "sdpa":
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        return _sdpa_varlen(q, k, v, cu_seqlens, max_seqlen, scale=scale)
    if b == "triton":
        return varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen, scale=scale)
    return varlen_attention_ref(q, k, v, cu_seqlens, max_seqlen, scale=scale)
