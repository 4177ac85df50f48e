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
    :mod:`scfm_fast.kernels._attention_triton`, our FlashAttention-style forward kernel; CUDA, or the
    CPU under ``TRITON_INTERPRET=1``. Forward only and without dropout: ``auto`` skips it while autograd
    records (an input requires grad) or ``dropout_p > 0``, and asking for it then raises, saying why.
``reference``
    :func:`varlen_attention_ref`, plain PyTorch per sequence in float32: the oracle.

Autograd policy: ``flash``, ``sdpa`` and ``reference`` are differentiable (PyTorch / flash-attn
backward; tested against torch autograd on padded inputs); ``triton`` is not and is never chosen then.
Attention-probability dropout (BERT's ``attention_probs_dropout_prob``, train mode) is applied by every
backend but ``triton``.

For cells of one length (no mask) :func:`dense_attention` is SDPA; :func:`padded_attention_ref` is
Hugging Face BERT's eager attention on padded batches with an additive key-padding bias.
:func:`backend_report` lists, for a device and dtype, which backends are usable and why the others
are not (printed by ``scfm info``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ._attention_triton import varlen_attention_triton
from ._utils import interpreting, triton_available

log = logging.getLogger("scfm_fast")

BACKENDS = ("flash", "sdpa", "triton", "reference")
__all__ = ["BACKENDS", "backend_report", "dense_attention", "key_padding_bias", "padded_attention_ref",
           "select_backend", "varlen_attention", "varlen_attention_ref", "varlen_attention_triton"]


# ----------------------------------------------------------------------------- dense (one length / padded)
def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_p: float = 0.0) -> torch.Tensor:
    """Unmasked attention of ``(..., heads, T, head_dim)`` cells that all have ``T`` rows (SDPA)."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


def key_padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, 1, 1, L)`` additive bias: 0 on real keys, ``finfo(dtype).min`` on padding (as HF BERT)."""
    bias = torch.zeros(attention_mask.shape[0], 1, 1, attention_mask.shape[-1], dtype=dtype,
                       device=attention_mask.device)
    return bias.masked_fill(~attention_mask.bool()[:, None, None, :], torch.finfo(dtype).min)


def padded_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, *,
                         dropout_p: float = 0.0) -> torch.Tensor:
    """Hugging Face BERT's eager attention on padded ``(B, heads, L, head_dim)``: softmax(q k^T / sqrt(d)
    + bias), dropout on the probabilities, times v."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    p = scores.softmax(-1)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return p @ v


# ----------------------------------------------------------------------------- reference
def varlen_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         max_seqlen: int | None = None, *, scale: float | None = None,
                         dropout_p: float = 0.0) -> torch.Tensor:
    """Softmax(q k^T * scale) v for each sequence separately, in float32 (the oracle; differentiable)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    cu = cu_seqlens.tolist()
    outs = [q[:0]]
    for s, e in zip(cu[:-1], cu[1:]):
        if e == s:
            continue
        qs, ks, vs = (t[s:e].float().transpose(0, 1) for t in (q, k, v))  # (H, L, D)
        p = torch.softmax(qs @ ks.transpose(-1, -2) * scale, dim=-1)
        if dropout_p > 0:
            p = F.dropout(p, dropout_p)
        outs.append((p @ vs).transpose(0, 1).to(q.dtype))
    return torch.cat(outs)


# ----------------------------------------------------------------------------- sdpa
_nested_failed: list[str] = []


def _sdpa_nested(q, k, v, cu_seqlens, max_seqlen, *, scale, dropout_p=0.0):
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
            o = F.scaled_dot_product_attention(nt(q), nt(k), nt(v), scale=scale, dropout_p=dropout_p)
    else:  # the CPU runs nested tensors through the math path: used by tests only
        o = F.scaled_dot_product_attention(nt(q), nt(k), nt(v), scale=scale, dropout_p=dropout_p)
    return o.transpose(1, 2).values().reshape(q.shape)


def _sdpa_varlen(q, k, v, cu_seqlens, max_seqlen, *, scale, layout=None, dropout_p=0.0):
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
            return _sdpa_nested(q, k, v, cu_seqlens, max_seqlen, scale=scale, dropout_p=dropout_p)
        except (RuntimeError, NotImplementedError, TypeError, AttributeError, ValueError) as e:
            _nested_failed.append(f"{type(e).__name__}: {e}")
            log.warning("SDPA on nested tensors failed (%s); using padded buckets", _nested_failed[0][:300])
    if layout == "per_cell":
        # split (not slices): under autograd each slice's backward would fill and add a zero tensor of the
        # whole batch per cell, O(cells x total) traffic; split's backward is one concatenation
        sizes = lengths.tolist()
        outs = [q[:0]]  # concatenated rather than written into ``out``: one clean autograd graph
        for qs, ks, vs in zip(q.split(sizes), k.split(sizes), v.split(sizes)):
            if qs.shape[0]:
                o = F.scaled_dot_product_attention(qs.transpose(0, 1).unsqueeze(0), ks.transpose(0, 1).unsqueeze(0),
                                                   vs.transpose(0, 1).unsqueeze(0), scale=scale, dropout_p=dropout_p)
                outs.append(o.squeeze(0).transpose(0, 1))
        return torch.cat(outs)
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
        o = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=mask, scale=scale,
                                           dropout_p=dropout_p)
        out[rows] = o.transpose(1, 2).reshape(g * lmax, nh, hd)[flat]
        i = j
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


def _triton_reasons(device: torch.device, dtype: torch.dtype, head_dim: int, *, needs_grad: bool,
                    dropout_p: float) -> list[str]:
    r = []
    if needs_grad:
        r.append("forward only (no backward): not used while autograd records")
    if dropout_p > 0:
        r.append(f"no attention dropout (dropout_p={dropout_p:g}, train mode)")
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


def not_supported_reasons(backend: str, *, device: torch.device | str, dtype: torch.dtype, head_dim: int,
                          needs_grad: bool = False, dropout_p: float = 0.0) -> list[str]:
    """Why ``backend`` cannot run these inputs (empty list: it can).

    ``needs_grad``: autograd records (an input requires grad); ``dropout_p``: attention dropout.
    """
    device = torch.device(device)
    if backend == "flash":
        return _flash_reasons(device, dtype, head_dim)
    if backend == "triton":
        return _triton_reasons(device, dtype, head_dim, needs_grad=needs_grad, dropout_p=dropout_p)
    if backend in ("sdpa", "reference"):
        return []
    return [f"unknown backend {backend!r}; choose from {BACKENDS}"]


def backend_report(device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                   head_dim: int = 64, *, needs_grad: bool = False, dropout_p: float = 0.0) -> list[dict]:
    """For each backend: name, whether it is usable for (device, dtype, head_dim), and why not."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for b in BACKENDS:
        reasons = not_supported_reasons(b, device=device, dtype=dtype, head_dim=head_dim, needs_grad=needs_grad,
                                        dropout_p=dropout_p)
        rows.append({"name": b, "usable": not reasons, "reasons": reasons, "device": str(device),
                     "dtype": str(dtype).removeprefix("torch."), "head_dim": head_dim})
    return rows


_logged: set = set()


def select_backend(q: torch.Tensor, backend: str = "auto", *, needs_grad: bool = False,
                   dropout_p: float = 0.0) -> str:
    """The backend ``backend`` resolves to for ``q``; raises listing every reason when none fits."""
    cands = BACKENDS if backend == "auto" else (backend,)
    reasons = {}
    for b in cands:
        r = not_supported_reasons(b, device=q.device, dtype=q.dtype, head_dim=q.shape[-1], needs_grad=needs_grad,
                                  dropout_p=dropout_p)
        if not r:
            key = (b, q.device.type, q.dtype, needs_grad)
            if key not in _logged:
                _logged.add(key)
                log.info("attention backend: %s (device %s, %s%s)", b, q.device, q.dtype,
                         ", with grad" if needs_grad else "")
            return b
        reasons[b] = r
    msg = "no attention backend fits: " + "; ".join(f"{b}: {', '.join(r)}" for b, r in reasons.items())
    raise RuntimeError(msg)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, *, scale: float | None = None, backend: str = "auto",
                     dropout_p: float = 0.0) -> torch.Tensor:
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
    dropout_p
        Dropout on the attention probabilities (pass 0 in eval mode).
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    b = select_backend(q, backend, needs_grad=needs_grad, dropout_p=dropout_p)
    if b == "flash":
        from flash_attn import flash_attn_varlen_func

        cu = cu_seqlens.to(torch.int32)
        return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=dropout_p,
                                      softmax_scale=scale)
    if b == "sdpa":
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        return _sdpa_varlen(q, k, v, cu_seqlens, max_seqlen, scale=scale, dropout_p=dropout_p)
    if b == "triton":
        return varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen, scale=scale)
    return varlen_attention_ref(q, k, v, cu_seqlens, max_seqlen, scale=scale, dropout_p=dropout_p)
