"""The unpadded fast encoder vs the padded reference and Hugging Face ``BertModel``; checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from scfm_fast._errors import InputFileError
from scfm_fast.kernels.padding import cu_seqlens_from_lengths
from scfm_fast.model.bert import BertEncoderModel
from scfm_fast.model.checkpoint import load_encoder, save_encoder
from scfm_fast.model.config import EncoderConfig
from tests._helpers import assert_close_to_baseline, init_like_bert, tiny_config

transformers = pytest.importorskip("transformers")
LENGTHS = [1, 13, 64, 2, 31]  # a length-1 cell, prime lengths, a full-context cell


def _batch(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    cells = [torch.randint(2, vocab, (n,), generator=g) for n in lengths]
    ids = torch.cat(cells)
    padded = torch.zeros(len(cells), max(lengths), dtype=torch.long)
    for i, c in enumerate(cells):
        padded[i, :c.numel()] = c
    return ids, cu_seqlens_from_lengths(torch.tensor(lengths)), max(lengths), padded


def _unpad(h, lengths):
    return torch.cat([h[i, :n] for i, n in enumerate(lengths)])


def _hf(model):
    cfg = transformers.BertConfig(**model.config.to_hf_dict())
    hf = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    return hf


@pytest.fixture(params=["triton", "torch"])
def kernel_path(request, monkeypatch):
    """Run the encoder through the Triton kernels (interpreter on CPU) and through plain torch ops."""
    monkeypatch.setenv("SCFM_FAST_TRITON", "1" if request.param == "triton" else "0")
    return request.param


@pytest.mark.parametrize("act", ["relu", "gelu", "silu"])
@pytest.mark.parametrize("layer", [-1, 1, 0])
def test_varlen_matches_reference_and_hf_fp32(act, layer, kernel_path):
    model = init_like_bert(BertEncoderModel(tiny_config(act=act))).eval()
    ids, cu, m, padded = _batch(LENGTHS, model.config.vocab_size)
    with torch.no_grad():
        fast = model.forward_varlen(ids, cu, m, layer=layer)
        ref = _unpad(model.forward_reference(padded, layer=layer), LENGTHS)
        hf_out = _hf(model)(input_ids=padded, attention_mask=(padded != 0).long(), output_hidden_states=True)
        hf = _unpad(hf_out.hidden_states[model.resolve_layer(layer)], LENGTHS)
    assert (fast - ref).abs().max() <= 1e-4
    assert (fast - hf).abs().max() <= 1e-4


@pytest.mark.parametrize("backend", ["sdpa", "triton", "reference"])
def test_attention_backends_in_the_encoder(backend):
    model = init_like_bert(BertEncoderModel(tiny_config())).eval()
    ids, cu, m, padded = _batch(LENGTHS, model.config.vocab_size)
    with torch.no_grad():
        fast = model.forward_varlen(ids, cu, m, attn_backend=backend)
        ref = _unpad(model.forward_reference(padded), LENGTHS)
    assert (fast - ref).abs().max() <= 1e-4


def test_bf16_no_worse_than_twice_reference_bf16(kernel_path):
    model = init_like_bert(BertEncoderModel(tiny_config(act="gelu"))).eval()
    ids, cu, m, padded = _batch(LENGTHS, model.config.vocab_size)
    with torch.no_grad():
        ref32 = _unpad(model.forward_reference(padded), LENGTHS)
        base = _unpad(_bf16_reference(model, padded), LENGTHS)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = model.forward_varlen(ids, cu, m)
    assert fast.dtype == torch.float32  # the residual stream stays float32 under autocast, as in HF
    assert_close_to_baseline(fast, ref32, base)


def _bf16_reference(model, padded):
    m16 = BertEncoderModel(model.config)
    m16.load_state_dict(model.state_dict())
    return m16.to(torch.bfloat16).eval().forward_reference(padded)


def test_cells_longer_than_the_model_are_refused():
    model = BertEncoderModel(tiny_config(positions=16)).eval()
    ids, cu, m, _ = _batch([17], model.config.vocab_size)
    with pytest.raises(ValueError, match="16 positions"):
        model.forward_varlen(ids, cu, m)


def test_checkpoint_round_trip_and_transformers_loads_it(tmp_path):
    model = init_like_bert(BertEncoderModel(tiny_config(act="gelu"))).eval()
    save_encoder(model, tmp_path / "ckpt")
    mlm = transformers.BertForMaskedLM.from_pretrained(tmp_path / "ckpt").eval()
    ids, cu, m, padded = _batch(LENGTHS, model.config.vocab_size)
    with torch.no_grad():
        hf = _unpad(mlm.bert(input_ids=padded, attention_mask=(padded != 0).long()).last_hidden_state, LENGTHS)
        again, head = load_encoder(tmp_path / "ckpt", return_head=True)
        assert (again.forward_varlen(ids, cu, m) - hf).abs().max() <= 1e-4
    assert any(k.startswith("cls.predictions") for k in head)
    # a real HF BertForMaskedLM save (pytorch_model.bin or safetensors, bert. prefix) loads too
    mlm.save_pretrained(tmp_path / "hf")
    loaded = load_encoder(tmp_path / "hf")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


def test_geneformer_v1_config_shapes(geneformer_v1_dir):
    cfg = EncoderConfig.from_json(geneformer_v1_dir / "config_6L_30M.json")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim) == (6, 256, 4, 64)
    assert cfg.hidden_act == "relu" and cfg.max_position_embeddings == 2048 and cfg.vocab_size == 25_426


def test_checkpoint_errors(tmp_path):
    with pytest.raises(InputFileError, match="not a checkpoint directory"):
        load_encoder(tmp_path / "none")
    (tmp_path / "c").mkdir()
    (tmp_path / "c/config.json").write_text(json.dumps(tiny_config().to_hf_dict()))
    with pytest.raises(InputFileError, match="no weights"):
        load_encoder(tmp_path / "c")
    save_encoder(BertEncoderModel(tiny_config()), tmp_path / "d")
    (tmp_path / "d/config.json").write_text(json.dumps(tiny_config(hidden=96, heads=4).to_hf_dict()))
    with pytest.raises(InputFileError, match="shape"):
        load_encoder(tmp_path / "d")


def test_checkpoint_without_config_or_with_unreadable_files(tmp_path):
    # each is an InputFileError naming the file (the CLI prints those), not FileNotFoundError / a safetensors error
    save_encoder(BertEncoderModel(tiny_config()), tmp_path / "d")
    (tmp_path / "d/config.json").unlink()
    with pytest.raises(InputFileError, match="no config.json"):
        load_encoder(tmp_path / "d")
    save_encoder(BertEncoderModel(tiny_config()), tmp_path / "e")
    w = tmp_path / "e/model.safetensors"
    w.write_bytes(w.read_bytes()[:100])  # an interrupted download
    with pytest.raises(InputFileError, match="model.safetensors: cannot read"):
        load_encoder(tmp_path / "e")
    (tmp_path / "e/config.json").write_text("{not json")
    with pytest.raises(InputFileError, match="config.json"):
        load_encoder(tmp_path / "e")
