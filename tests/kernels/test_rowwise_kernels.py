"""Triton row kernels (LayerNorm, bias+activation, embeddings, pooling) vs their PyTorch references.

On the CPU these run under TRITON_INTERPRET=1 (set in conftest) with small awkward shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scfm_fast.kernels.bias_act import BiasActFunction, bias_act_forward, bias_act_ref
from scfm_fast.kernels.embeddings import embeddings_forward, embeddings_ref
from scfm_fast.kernels.layer_norm import AddLayerNormFunction, layer_norm_forward, layer_norm_ref
from scfm_fast.kernels.padding import cu_seqlens_from_lengths
from scfm_fast.kernels.pooling import first_token, segment_mean_forward, segment_mean_ref
from tests._helpers import assert_close_to_baseline

SHAPES = [(1, 48), (7, 45), (13, 257)]


@pytest.mark.parametrize("rows,n", SHAPES)
@pytest.mark.parametrize("residual", [True, False])
def test_layer_norm_fp32(rows, n, residual):
    x, r = torch.randn(rows, n), torch.randn(rows, n) if residual else None
    w, b = torch.randn(n), torch.randn(n)
    torch.testing.assert_close(layer_norm_forward(x, r, w, b, 1e-12), layer_norm_ref(x, r, w, b, 1e-12),
                               atol=2e-6, rtol=1e-5)


def test_layer_norm_bf16_and_backward():
    x, r = torch.randn(5, 45), torch.randn(5, 45)
    w, b = torch.randn(45), torch.randn(45)
    ref = layer_norm_ref(x, r, w, b, 1e-12)
    assert_close_to_baseline(layer_norm_forward(x.bfloat16(), r.bfloat16(), w, b, 1e-12), ref,
                             layer_norm_ref(x.bfloat16(), r.bfloat16(), w, b, 1e-12))
    xs, rs, ws, bs = (t.clone().requires_grad_() for t in (x, r, w, b))
    AddLayerNormFunction.apply(xs, rs, ws, bs, 1e-12).pow(2).sum().backward()
    # Gradients against torch's own LayerNorm autograd (independent of our reference function), so a
    # swapped or mis-scaled gradient in the wrapper fails.
    xr, rr, wr, br = (t.clone().requires_grad_() for t in (x, r, w, b))
    F.layer_norm(xr + rr, (45,), wr, br, 1e-12).pow(2).sum().backward()
    for a, c in ((xs, xr), (rs, rr), (ws, wr), (bs, br)):
        torch.testing.assert_close(a.grad, c.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_new", "silu"])
@pytest.mark.parametrize("rows,n", SHAPES)
def test_bias_act(act, rows, n):
    x, b = torch.randn(rows, n), torch.randn(n)
    torch.testing.assert_close(bias_act_forward(x, b, act), bias_act_ref(x, b, act), atol=2e-6, rtol=1e-5)
    xs, bs = x.clone().requires_grad_(), b.clone().requires_grad_()
    xr, br = x.clone().requires_grad_(), b.clone().requires_grad_()
    torch_act = {"relu": F.relu, "gelu": F.gelu, "gelu_new": lambda h: F.gelu(h, approximate="tanh"),
                 "silu": F.silu}[act]
    # A random upstream gradient, so a gradient that ignores it (or sums rows wrongly) fails.
    g = torch.randn(rows, n)
    (BiasActFunction.apply(xs, bs, act) * g).sum().backward()
    (torch_act(xr + br) * g).sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad)
    torch.testing.assert_close(bs.grad, br.grad)


def test_bias_act_rejects_unknown_activation():
    with pytest.raises(ValueError, match="tanh"):
        bias_act_forward(torch.randn(2, 3), torch.randn(3), "tanh")


@pytest.mark.parametrize("n", [48, 45])
def test_embeddings(n):
    word, pos, t0 = torch.randn(50, n), torch.randn(20, n), torch.randn(n)
    w, b = torch.randn(n), torch.randn(n)
    ids, p = torch.randint(0, 50, (11,)), torch.randint(0, 20, (11,))
    torch.testing.assert_close(embeddings_forward(ids, p, word, pos, t0, w, b, 1e-12),
                               embeddings_ref(ids, p, word, pos, t0, w, b, 1e-12), atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="positions"):
        embeddings_forward(ids, torch.full((11,), 20), word, pos, t0, w, b, 1e-12)


@pytest.mark.parametrize("bad", [50, -1])
def test_embeddings_refuse_ids_outside_the_vocabulary(bad):
    # the kernel gathers rows unchecked: an id from another token dictionary must not read past the table
    word, pos, t0, w, b = torch.randn(50, 48), torch.randn(20, 48), torch.randn(48), torch.randn(48), torch.randn(48)
    ids = torch.tensor([3, bad, 4])
    with pytest.raises(ValueError, match="vocabulary has 50"):
        embeddings_forward(ids, torch.arange(3), word, pos, t0, w, b, 1e-12)


def test_segment_mean_excludes_and_empty_is_nan():
    cu = cu_seqlens_from_lengths(torch.tensor([1, 40, 3, 2]))
    x = torch.randn(46, 45)
    keep = torch.rand(46) > 0.3
    keep[44:] = False  # last cell: only special tokens -> NaN, never a silent zero
    got, ref = segment_mean_forward(x, cu, keep), segment_mean_ref(x, cu, keep)
    assert torch.isnan(got[3]).all() and torch.isnan(ref[3]).all()
    torch.testing.assert_close(got[:3].nan_to_num(), ref[:3].nan_to_num(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(first_token(x, cu), x[[0, 1, 41, 44]])


def test_kernel_that_does_not_build_falls_back_once(monkeypatch, caplog):
    # a Triton compile/resource error on some GPU: warn once, use PyTorch ops for that kernel from then on
    from triton.runtime.errors import OutOfResources

    from scfm_fast.kernels import _utils, layer_norm

    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise OutOfResources(300_000, 232_448, "shared memory")

    monkeypatch.setattr(layer_norm, "layer_norm_forward", broken)
    monkeypatch.setattr(_utils, "FAILED_KERNELS", {})
    x, r, w, b = torch.randn(5, 40), torch.randn(5, 40), torch.randn(40), torch.randn(40)
    with pytest.raises(OutOfResources):  # the test suite runs strict: a kernel that fails must fail its tests
        layer_norm.add_layer_norm(x, r, w, b, 1e-12)
    monkeypatch.setenv("SCFM_FAST_TRITON_STRICT", "0")
    with caplog.at_level("WARNING", logger="scfm_fast"):
        for _ in range(2):
            torch.testing.assert_close(layer_norm.add_layer_norm(x, r, w, b, 1e-12), layer_norm_ref(x, r, w, b, 1e-12),
                                       atol=2e-6, rtol=1e-5)
    assert len(calls) == 2 and "add_layer_norm" in _utils.FAILED_KERNELS
    assert sum("add_layer_norm" in m for m in caplog.messages) == 1
    # errors that are not Triton's (wrong inputs, CUDA errors) still raise, and disable nothing
    monkeypatch.setattr(_utils, "FAILED_KERNELS", {})

    def bad_input(*a, **k):
        raise ValueError("layer_norm: weight/bias must have shape (40,)")

    monkeypatch.setattr(layer_norm, "layer_norm_forward", bad_input)
    with pytest.raises(ValueError, match="weight/bias"):
        layer_norm.add_layer_norm(x, r, w, b, 1e-12)
    assert _utils.FAILED_KERNELS == {}


def test_layer_norm_half_projection_plus_float32_residual_stays_float32():
    # under autocast the projection is bf16 and the residual stream float32: the sum (and the output)
    # keep float32, as torch's own x + residual -> layer_norm does
    x, r = torch.randn(7, 45).bfloat16(), torch.randn(7, 45)
    w, b = torch.randn(45), torch.randn(45)
    out = layer_norm_forward(x, r, w, b, 1e-12)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.layer_norm(x.float() + r, (45,), w, b, 1e-12), atol=2e-6, rtol=1e-5)
    xs, rs = x.clone().requires_grad_(), r.clone().requires_grad_()
    AddLayerNormFunction.apply(xs, rs, w, b, 1e-12).sum().backward()
    assert xs.grad.dtype == torch.bfloat16 and rs.grad.dtype == torch.float32
