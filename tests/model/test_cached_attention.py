"""Cached-attention bookkeeping (model/cached_attention.py) against plain softmax attention of the changed
key set."""

from __future__ import annotations

import math

import pytest
import torch

from scfm_fast.model.cached_attention import attention_over_two_sets, attention_with_lse, update_attention


def _attn(q, k, v, scale):
    return torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale, -1) @ v.double()


@pytest.mark.parametrize("L", [2, 7, 33])
def test_removing_and_adding_keys_equals_attention_over_the_new_key_set(L):
    g = torch.Generator().manual_seed(L)
    nh, hd, m = 3, 5, 1
    scale = 1 / math.sqrt(hd)
    q, k, v = (torch.randn(nh, L, hd, generator=g) for _ in range(3))
    o, lse = attention_with_lse(q, k, v, scale=scale)
    torch.testing.assert_close(o, _attn(q, k, v, scale), rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp((q.double() @ k.double().transpose(-1, -2)) * scale, -1))
    rm = L // 2
    keep = [j for j in range(L) if j != rm]
    got = update_attention(q, o, lse, k[:, rm:rm + m], v[:, rm:rm + m], scale=scale)
    if L > 1:
        torch.testing.assert_close(got, _attn(q, k[:, keep], v[:, keep], scale), rtol=0, atol=1e-10)
    kn, vn = torch.randn(nh, 2, hd, generator=g), torch.randn(nh, 2, hd, generator=g)
    got = update_attention(q, o, lse, k[:, rm:rm + m], v[:, rm:rm + m], scale=scale, k_new=kn, v_new=vn)
    want = _attn(q, torch.cat([k[:, keep], kn], 1), torch.cat([v[:, keep], vn], 1), scale)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_attention_over_two_sets_leaves_out_dropped_keys():
    g = torch.Generator().manual_seed(0)
    nh, L, hd = 2, 6, 4
    q = torch.randn(3, nh, 2, hd, generator=g)
    k1, v1 = torch.randn(1, nh, L, hd, generator=g), torch.randn(1, nh, L, hd, generator=g)
    k2, v2 = torch.randn(3, nh, 2, hd, generator=g), torch.randn(3, nh, 2, hd, generator=g)
    drop = torch.zeros(3, 1, 1, L, dtype=torch.bool)
    drop[1, ..., 4] = True
    got = attention_over_two_sets(q, k1, v1, drop, k2, v2, scale=0.5)
    for b in range(3):
        keep = [j for j in range(L) if not drop[b, 0, 0, j]]
        want = _attn(q[b], torch.cat([k1[0][:, keep], k2[b]], 1), torch.cat([v1[0][:, keep], v2[b]], 1), 0.5)
        torch.testing.assert_close(got[b], want, rtol=0, atol=1e-12)
