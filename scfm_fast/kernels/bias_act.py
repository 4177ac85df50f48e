"""Fused bias + activation: ``y = act(x + bias)`` for ReLU, GELU (erf and tanh forms) and SiLU.

Reference: :func:`bias_act_ref` (``F.relu / F.gelu / F.silu`` of ``x + bias``), i.e. BERT's
``BertIntermediate`` after its matmul. One Triton program per row; float32 math; the backward pass is
computed in PyTorch from the saved pre-activation input.
"""

from __future__ import annotations

import torch

try:  # a Linux dependency; without it the PyTorch ops below are used
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None

from ._utils import row_block, run_kernel, use_triton
from .activations import ACTIVATIONS, get_activation

# kernel formula per hidden_act name (from the one activation table)
ACTS = {name: a.code for name, a in ACTIVATIONS.items()}


def bias_act_ref(x: torch.Tensor, bias: torch.Tensor, act: str) -> torch.Tensor:
    """PyTorch reference in float32, cast back to ``x.dtype``."""
    return get_activation(act).fn(x.float() + bias.float()).to(x.dtype)


if triton is not None:

    @triton.jit
    def _bias_act_fwd(X, B, Y, stride_x, stride_y, N, ACT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: rows * stride can pass 2**31
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        h = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        h += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        if ACT == 0:
            y = tl.maximum(h, 0.0)
        elif ACT == 1:
            y = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
        elif ACT == 2:
            u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
            y = 0.5 * h * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0))
        else:
            y = h / (1.0 + tl.exp(-h))
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def _kernel():
    return _bias_act_fwd


def bias_act_forward(x: torch.Tensor, bias: torch.Tensor, act: str) -> torch.Tensor:
    """Launch the Triton kernel on ``(..., N)`` inputs."""
    get_activation(act)  # a clear error for an unknown name
    n = x.shape[-1]
    if bias.shape != (n,):
        msg = f"bias_act: bias must have shape ({n},), got {tuple(bias.shape)}"
        raise ValueError(msg)
    x2 = x.reshape(-1, n).contiguous()
    y = torch.empty_like(x2)
    if x2.shape[0]:
        block = min(row_block(n)[0], 1024)
        _kernel()[(x2.shape[0], triton.cdiv(n, block))](x2, bias.contiguous(), y, x2.stride(0), y.stride(0), n,
                                                        ACT=ACTS[act], BLOCK=block)
    return y.view(x.shape)


class BiasActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, act):
        ctx.save_for_backward(x, bias)
        ctx.act = act
        return bias_act_forward(x, bias, act)

    @staticmethod
    def backward(ctx, grad):
        x, bias = ctx.saved_tensors
        with torch.enable_grad():
            xs, bs = x.detach().requires_grad_(), bias.detach().requires_grad_()
            gx, gb = torch.autograd.grad(bias_act_ref(xs, bs, ctx.act), (xs, bs), grad)
        return gx, gb, None


def bias_act(x: torch.Tensor, bias: torch.Tensor, act: str) -> torch.Tensor:
    """``act(x + bias)``: Triton on CUDA (or under the interpreter), PyTorch otherwise."""
    fn = get_activation(act).fn

    def torch_ops() -> torch.Tensor:
        return fn(x + bias)

    if use_triton(x):
        return run_kernel("bias_act", lambda: BiasActFunction.apply(x, bias, act), torch_ops)
    return torch_ops()
