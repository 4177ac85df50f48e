"""Varlen attention backends and pad/unpad helpers vs their references."""

from __future__ import annotations

import pytest
import torch

from scfm_fast.kernels.attention import (
    backend_report,
    not_supported_reasons,
    select_backend,
    varlen_attention,
    varlen_attention_ref,
)
from scfm_fast.kernels.padding import (
    cu_seqlens_from_lengths,
    pad,
    pad_packed,
    position_ids_from_cu_seqlens,
    unpad,
)
from tests._helpers import assert_close_to_baseline

LENGTHS = [[1], [7, 1, 13], [31, 2, 17, 5], [40]]


def _qkv(lengths, heads=3, dim=20, dtype=torch.float32):
    cu = cu_seqlens_from_lengths(torch.tensor(lengths))
    total = int(cu[-1])
    return [torch.randn(total, heads, dim).to(dtype) for _ in range(3)], cu, max(lengths)


def test_padding_round_trip():
    lengths = torch.tensor([3, 1, 5])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    x = torch.randn(3, 5, 4)
    packed, idx, cu, max_len = unpad(x, mask)
    assert cu.tolist() == [0, 3, 4, 9] and max_len == 5 and cu.dtype == torch.int32
    back = pad(packed, idx, 3, 5)
    assert torch.equal(back[mask], x[mask]) and torch.all(back[~mask] == 0)
    padded, m2 = pad_packed(packed, cu, 5)
    assert torch.equal(m2, mask) and torch.equal(padded[mask], x[mask])
    assert position_ids_from_cu_seqlens(cu).tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4]


@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_backends_match_reference_fp32(lengths, backend):
    (q, k, v), cu, m = _qkv(lengths)
    ref = varlen_attention_ref(q, k, v, cu, m)
    torch.testing.assert_close(varlen_attention(q, k, v, cu, m, backend=backend), ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("lengths", LENGTHS + [[6, 6, 6], [4, 0, 9]])
@pytest.mark.parametrize("layout", ["bucketed", "nested", "per_cell"])
@pytest.mark.filterwarnings("ignore::UserWarning")  # nested tensors are a "prototype" API on the CPU
def test_sdpa_layouts_match_reference(lengths, layout):
    # every SDPA layout (CUDA's nested and bucketed ones included) checked on the CPU too; the nested
    # one without its fallback, so that a failure shows
    from scfm_fast.kernels.attention import _sdpa_nested, _sdpa_varlen

    (q, k, v), cu, m = _qkv(lengths + [3, 3, 29])
    ref = varlen_attention_ref(q, k, v, cu, m)
    if layout == "nested":
        out = _sdpa_nested(q, k, v, cu, m, scale=20 ** -0.5)
    else:
        out = _sdpa_varlen(q, k, v, cu, m, scale=20 ** -0.5, layout=layout)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_nested_failure_falls_back_to_buckets_once(monkeypatch, caplog):
    # a PyTorch build whose nested SDPA cannot run: same answer through padded buckets, one warning,
    # and later calls go straight to the buckets
    import scfm_fast.kernels.attention as attn

    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("No available kernel (simulated)")

    monkeypatch.setattr(attn, "_sdpa_nested", broken)
    monkeypatch.setattr(attn, "_nested_failed", [])
    (q, k, v), cu, m = _qkv([5, 17, 9])
    ref = varlen_attention_ref(q, k, v, cu, m)
    with caplog.at_level("WARNING", logger=attn.log.name):
        for _ in range(2):
            out = attn._sdpa_varlen(q, k, v, cu, m, scale=20 ** -0.5, layout="nested")
            torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    assert len(calls) == 1 and "simulated" in attn._nested_failed[0]
    assert sum("nested tensors failed" in r.message for r in caplog.records) == 1


def test_attention_never_crosses_cells():
    (q, k, v), cu, m = _qkv([5, 6])
    out = varlen_attention(q, k, v, cu, m, backend="triton")
    k2, v2 = k.clone(), v.clone()
    k2[5:] += 100.0
    v2[5:] -= 7.0
    torch.testing.assert_close(varlen_attention(q, k2, v2, cu, m, backend="triton")[:5], out[:5])


# Triton's CPU interpreter mishandles bf16 inputs to tl.dot (numpy has no bfloat16), so the
# interpreter run checks fp16; bf16 is covered on CUDA by test_triton_attention_cuda_long_cells.
@pytest.mark.parametrize("backend,dtype", [("sdpa", torch.bfloat16), ("sdpa", torch.float16),
                                           ("triton", torch.float16)])
def test_low_precision_within_twice_reference_error(backend, dtype):
    (q, k, v), cu, m = _qkv([9, 23, 4])
    ref = varlen_attention_ref(q, k, v, cu, m)
    qb, kb, vb = (t.to(dtype) for t in (q, k, v))
    base = varlen_attention_ref(qb, kb, vb, cu, m)
    assert_close_to_baseline(varlen_attention(qb, kb, vb, cu, m, backend=backend), ref, base)


def test_dispatch_reasons():
    q = torch.randn(4, 2, 16)
    assert select_backend(q) == "sdpa"  # flash-attn needs CUDA + half precision
    reasons = not_supported_reasons("flash", device="cpu", dtype=torch.float32, head_dim=20)
    assert any("CUDA" in r for r in reasons) and any("multiple of 8" in r for r in reasons)
    rep = {r["name"]: r for r in backend_report(device="cpu", dtype=torch.float32)}
    assert set(rep) == {"flash", "sdpa", "triton", "reference"} and rep["sdpa"]["usable"]
    with pytest.raises(RuntimeError, match="flash:"):
        varlen_attention(q, q, q, cu_seqlens_from_lengths(torch.tensor([4])), 4, backend="flash")


@pytest.mark.cuda
def test_triton_attention_cuda_long_cells():
    (q, k, v), cu, m = _qkv([2048, 700, 1], heads=4, dim=64, dtype=torch.bfloat16)
    q, k, v, cu = q.cuda(), k.cuda(), v.cuda(), cu.cuda()
    ref = varlen_attention_ref(q.float(), k.float(), v.float(), cu, m)
    base = varlen_attention_ref(q, k, v, cu, m)
    # atol: the kernel rounds the probabilities to bf16 before the P @ V dot, as FlashAttention does,
    # which the reference (one softmax, then one matmul) does not
    assert_close_to_baseline(varlen_attention(q, k, v, cu, m, backend="triton"), ref, base, atol=2e-3)


def test_info_names_the_backend_auto_picks_and_for_what():
    from scfm_fast.info import info_text

    dev, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    chosen = select_backend(torch.empty(1, 1, 64, device=dev, dtype=dtype))
    text = info_text()
    assert f"attention backends for {dev}, {str(dtype).removeprefix('torch.')}, head_dim 64" in text
    assert f"auto picks the first usable: {chosen}" in text and f"{chosen:<12} usable, chosen" in text
