"""The shared layer maths: every layout (one length, packed, padded) agrees, and the class keeps the
interface the perturbation engines use (it replaced their private copy, bit for bit)."""

from __future__ import annotations

import pytest
import torch

from scfm_fast.kernels.padding import cu_seqlens_from_lengths
from scfm_fast.model.bert import BertEncoderModel
from scfm_fast.model.layers import EncoderParams, autocast_ctx
from tests._helpers import init_like_bert, tiny_config

INTERFACE = ("embed", "qkv", "split_heads", "merge_heads", "post_attention", "layer", "layer_first_row", "run")
ATTRIBUTES = ("hidden", "n_heads", "head_dim", "max_pos", "act", "word", "pos", "tt0", "eln", "layers")


@pytest.fixture(autouse=True)
def _torch_row_ops(monkeypatch):
    monkeypatch.setenv("SCFM_FAST_TRITON", "0")


def _model(act="relu"):
    return init_like_bert(BertEncoderModel(tiny_config(act=act))).eval()


def test_interface_of_the_perturbation_engines():
    P = EncoderParams(_model())
    for name in INTERFACE:
        assert callable(getattr(P, name)), name
    for name in ATTRIBUTES:
        assert hasattr(P, name), name
    assert P.eln[2] == 1e-12 and len(P.layers) == 2


def test_layouts_agree_one_length_packed_padded():
    m = _model("gelu")
    P = EncoderParams(m)
    lengths = [5, 9, 1]
    g = torch.Generator().manual_seed(1)
    cells = [torch.randint(2, m.config.vocab_size, (n,), generator=g) for n in lengths]
    ids = torch.cat(cells)
    cu = cu_seqlens_from_lengths(torch.tensor(lengths))
    with torch.no_grad():
        packed = m.forward_varlen(ids, cu, max(lengths))
        padded = torch.zeros(3, 9, dtype=torch.long)
        for i, c in enumerate(cells):
            padded[i, :c.numel()] = c
        ref = m.forward_reference(padded)
        for i, c in enumerate(cells):
            one = P.run(P.embed(c[None], torch.arange(c.numel())[None]), 2)[0]
            torch.testing.assert_close(one, packed[cu[i]:cu[i + 1]], rtol=0, atol=2e-5)
            torch.testing.assert_close(one, ref[i, :c.numel()], rtol=0, atol=2e-5)


def test_encoder_entry_points_run_given_embeddings():
    # encoder_varlen / encoder_padded: the layers on embedding outputs from elsewhere (GeneCompass)
    m = _model("silu")
    lengths = [4, 7]
    ids = torch.randint(2, m.config.vocab_size, (11,))
    cu = cu_seqlens_from_lengths(torch.tensor(lengths))
    with torch.no_grad():
        from scfm_fast.kernels.padding import pad_packed, position_ids_from_cu_seqlens

        h0 = EncoderParams(m).embed(ids, position_ids_from_cu_seqlens(cu))
        v = m.encoder_varlen(h0, cu, 7, n_layers=1)
        torch.testing.assert_close(v, m.forward_varlen(ids, cu, 7, layer=1), rtol=0, atol=0)
        hp, mask = pad_packed(h0, cu, 7)
        p = m.encoder_padded(hp, mask, n_layers=1)
        torch.testing.assert_close(p[mask], v, rtol=0, atol=2e-5)


def test_float32_residual_stream_under_autocast():
    # half-precision GEMMs, float32 residual sums and LayerNorms (as eager HF BERT under autocast)
    m = _model("relu")
    P = EncoderParams(m)
    ids = torch.randint(2, m.config.vocab_size, (2, 6))
    with torch.no_grad(), autocast_ctx(torch.device("cpu"), torch.bfloat16):
        h = P.embed(ids, torch.arange(6).expand(2, 6))
        assert h.dtype == torch.float32 and P.qkv(0, h).dtype == torch.bfloat16
        assert P.run(h, 2).dtype == torch.float32
    with torch.no_grad(), autocast_ctx(torch.device("cpu"), torch.float32):  # fp32: autocast off
        assert P.qkv(0, h).dtype == torch.float32
