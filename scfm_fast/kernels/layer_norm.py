"""Fused residual add + LayerNorm: ``y = LayerNorm(x + residual) * weight + bias``.

Reference: :func:`layer_norm_ref` (``torch.nn.functional.layer_norm`` on ``x + residual``), which is
what BERT's ``BertSelfOutput`` / ``BertOutput`` compute. The Triton kernel holds one row per program,
accumulates in float32 and writes the dtype of the sum ``x + residual`` (so a half-precision projection
added to a float32 residual stream stays float32, as eager PyTorch under autocast). The backward pass
recomputes the normalisation in PyTorch from the saved inputs.
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


def layer_norm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """PyTorch reference: ``F.layer_norm(x + residual)`` in float32, cast to the dtype of the sum."""
    h = x.float() if residual is None else x.float() + residual.float()
    return F.layer_norm(h, (x.shape[-1],), weight.float(), bias.float(), eps).to(_out_dtype(x, residual))


def _out_dtype(x: torch.Tensor, residual: torch.Tensor | None) -> torch.dtype:
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


if triton is not None:

    @triton.jit
    def _add_layer_norm_fwd(X, R, W, B, Y, stride_x, stride_r, stride_y, N, eps,
                            HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: rows * stride can pass 2**31
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            x += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / N
        xc = tl.where(mask, x - mean, 0.0)
        var = tl.sum(xc * xc, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (xc * rstd * w + b).to(Y.dtype.element_ty), mask=mask)


def _kernel():
    return _add_layer_norm_fwd


def layer_norm_forward(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Launch the Triton kernel on ``(..., N)`` inputs."""
    shape = x.shape
    n = shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    r2 = residual.reshape(-1, n).contiguous() if residual is not None else x2
    if weight.shape != (n,) or bias.shape != (n,):
        msg = f"layer_norm: weight/bias must have shape ({n},), got {tuple(weight.shape)}/{tuple(bias.shape)}"
        raise ValueError(msg)
    y = torch.empty(x2.shape, dtype=_out_dtype(x, residual), device=x2.device)
    if x2.shape[0]:
        block, warps = row_block(n)
        _kernel()[(x2.shape[0],)](x2, r2, weight.contiguous(), bias.contiguous(), y, x2.stride(0),
                                  r2.stride(0), y.stride(0), n, eps, HAS_RES=residual is not None,
                                  BLOCK=block, num_warps=warps)
    return y.view(shape)


class AddLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        ctx.save_for_backward(x, residual if residual is not None else x.new_empty(0), weight, bias)
        ctx.has_res, ctx.eps = residual is not None, eps
        return layer_norm_forward(x, residual, weight, bias, eps)

    @staticmethod
    def backward(ctx, grad):
        x, residual, weight, bias = ctx.saved_tensors
        with torch.enable_grad():
            xs = x.detach().requires_grad_()
            rs = residual.detach().requires_grad_() if ctx.has_res else None
            ws, bs = weight.detach().requires_grad_(), bias.detach().requires_grad_()
            y = layer_norm_ref(xs, rs, ws, bs, ctx.eps)
            inputs = [xs, ws, bs] + ([rs] if ctx.has_res else [])
            grads = torch.autograd.grad(y, inputs, grad)
        gx, gw, gb = grads[:3]
        gr = grads[3] if ctx.has_res else None
        return gx, gr, gw, gb, None


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """``LayerNorm(x + residual)``: Triton on CUDA (or under the interpreter), PyTorch otherwise."""
    def torch_ops() -> torch.Tensor:
        h = x if residual is None else x + residual
        return F.layer_norm(h, (x.shape[-1],), weight, bias, eps)

    if use_triton(x):
        return run_kernel("add_layer_norm", lambda: AddLayerNormFunction.apply(x, residual, weight, bias, eps),
                          torch_ops)
    return torch_ops()
