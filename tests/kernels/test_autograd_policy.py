"""One autograd policy: every kernel that may run under grad has a backward that equals torch autograd,
or is not used (and refuses by name) while autograd records."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import scfm_fast.kernels.attention as attn
from scfm_fast.kernels.embeddings import bert_embeddings
from scfm_fast.kernels.padding import cu_seqlens_from_lengths, pad_packed, position_ids_from_cu_seqlens
from scfm_fast.kernels.pooling import segment_mean

LENGTHS = [3, 1, 17, 8]


def _qkv(seed=0, heads=2, hd=16):
    g = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)
    return [torch.randn(total, heads, hd, generator=g).requires_grad_() for _ in range(3)]


def _padded_grads(q, k, v, cu, m, g_out):
    """Gradients of plain padded attention with a key mask: the independent oracle."""
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    qp, mask = pad_packed(qs, cu, m)
    kp, _ = pad_packed(ks, cu, m)
    vp, _ = pad_packed(vs, cu, m)
    o = F.scaled_dot_product_attention(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2),
                                       attn_mask=mask[:, None, None, :])
    (o.transpose(1, 2)[mask] * g_out).sum().backward()
    return qs.grad, ks.grad, vs.grad


@pytest.mark.parametrize("how", ["reference", "sdpa-per_cell", "sdpa-bucketed", "sdpa-nested"])
def test_attention_backward_equals_torch_autograd(how):
    q, k, v = _qkv()
    cu = cu_seqlens_from_lengths(torch.tensor(LENGTHS))
    m = max(LENGTHS)
    if how == "reference":
        out = attn.varlen_attention(q, k, v, cu, m, backend="reference")
    else:
        out = attn._sdpa_varlen(q, k, v, cu, m, scale=0.25, layout=how.split("-")[1])
    g_out = torch.randn(out.shape)
    (out * g_out).sum().backward()
    for ours, ref in zip((q.grad, k.grad, v.grad), _padded_grads(q, k, v, cu, m, g_out)):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_auto_never_picks_triton_under_grad_and_triton_refuses(monkeypatch):
    picked = []
    real = attn.select_backend

    def spy(q, backend="auto", **kw):
        b = real(q, backend, **kw)
        picked.append(b)
        return b

    monkeypatch.setattr(attn, "select_backend", spy)
    # only Triton and the reference are candidates: auto must skip Triton once grad is on
    monkeypatch.setattr(attn, "BACKENDS", ("triton", "reference"))
    q, k, v = _qkv()
    cu = cu_seqlens_from_lengths(torch.tensor(LENGTHS))
    attn.varlen_attention(q, k, v, cu, max(LENGTHS))
    assert picked[-1] == "reference"
    with pytest.raises(RuntimeError, match="forward only"):
        attn.varlen_attention(q, k, v, cu, max(LENGTHS), backend="triton")
    with torch.no_grad():
        attn.varlen_attention(q, k, v, cu, max(LENGTHS))
    if not attn.not_supported_reasons("triton", device=q.device, dtype=q.dtype, head_dim=16):
        assert picked[-1] == "triton"  # without grad the kernel is used where it can run


def test_triton_attention_refuses_dropout():
    q, k, v = (t.detach() for t in _qkv())
    cu = cu_seqlens_from_lengths(torch.tensor(LENGTHS))
    with pytest.raises(RuntimeError, match="dropout"):
        attn.varlen_attention(q, k, v, cu, max(LENGTHS), backend="triton", dropout_p=0.1)
    rows = {r["name"]: r for r in attn.backend_report("cpu", torch.float32, 16, needs_grad=True)}
    assert any("forward only" in s for s in rows["triton"]["reasons"]) and rows["reference"]["usable"]


def test_attention_dropout_keeps_the_expectation():
    # dropout scales kept probabilities by 1/(1-p): averaged over many draws the output is unchanged
    q, k, v = (t.detach() for t in _qkv(heads=1, hd=8))
    cu = cu_seqlens_from_lengths(torch.tensor(LENGTHS))
    ref = attn.varlen_attention(q, k, v, cu, max(LENGTHS), backend="reference")
    for backend in ("reference", "sdpa"):
        draws = torch.stack([attn.varlen_attention(q, k, v, cu, max(LENGTHS), backend=backend, dropout_p=0.3)
                             for _ in range(150)])
        assert (draws[0] - ref).abs().max() > 1e-2
        assert (draws.mean(0) - ref).abs().max() < 0.25


def test_embeddings_under_grad_take_the_torch_path_with_its_gradients():
    g = torch.Generator().manual_seed(0)
    word, pos = torch.randn(30, 20, generator=g), torch.randn(16, 20, generator=g)
    t0, w, b = torch.randn(20, generator=g), torch.randn(20, generator=g), torch.randn(20, generator=g)
    cu = cu_seqlens_from_lengths(torch.tensor([5, 11]))
    ids, p = torch.randint(0, 30, (16,), generator=g), position_ids_from_cu_seqlens(cu)
    params = [t.clone().requires_grad_() for t in (word, pos, t0, w, b)]
    out = bert_embeddings(ids, p, *params, 1e-12)
    g_out = torch.randn(out.shape, generator=g)
    (out * g_out).sum().backward()
    ref = [t.clone().requires_grad_() for t in (word, pos, t0, w, b)]
    h = ref[0][ids] + ref[1][p] + ref[2]
    (F.layer_norm(h, (20,), ref[3], ref[4], 1e-12) * g_out).sum().backward()
    for a, c in zip(params, ref):
        torch.testing.assert_close(a.grad, c.grad)


def test_segment_mean_under_grad_equals_torch_autograd():
    x = torch.randn(16, 6).requires_grad_()
    cu = cu_seqlens_from_lengths(torch.tensor([5, 11]))
    keep = torch.rand(16) > 0.3
    keep[0] = keep[5] = True
    segment_mean(x, cu, keep).pow(2).sum().backward()
    xr = x.detach().clone().requires_grad_()
    means = torch.stack([xr[s:e][keep[s:e]].mean(0) for s, e in ((0, 5), (5, 16))])
    means.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
