"""MLMHead against transformers' BertForMaskedLM head (tied, untied, selected rows); the model-family
registry (BERT family loads, GeneCompass detected by its config keys, unknown families refused)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from scfm_fast._errors import InputFileError
from scfm_fast.model import registry
from scfm_fast.model.checkpoint import load_encoder, load_masked_lm, save_encoder
from scfm_fast.model.heads import MLMHead
from tests._helpers import init_like_bert, tiny_config

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _torch_row_ops(monkeypatch):
    monkeypatch.setenv("SCFM_FAST_TRITON", "0")


def _hf_mlm(tmp_path, *, tied, act="gelu"):
    cfg = tiny_config(act=act).to_hf_dict()
    cfg["tie_word_embeddings"] = tied
    mlm = init_like_bert(transformers.BertForMaskedLM(transformers.BertConfig(**cfg)).eval())
    mlm.save_pretrained(tmp_path / "ckpt")
    return mlm


@pytest.mark.parametrize("tied", [True, False])
def test_head_logits_equal_transformers_on_selected_rows(tmp_path, tied):
    mlm = _hf_mlm(tmp_path, tied=tied)
    enc, head = load_masked_lm(tmp_path / "ckpt")
    assert head.tied == tied
    if tied:
        assert head.decoder_weight is enc.embeddings.word_embeddings.weight
    padded = torch.randint(2, 97, (2, 12))
    rows = torch.tensor([0, 5, 11, 17, 23])
    with torch.no_grad():
        hf_logits = mlm(input_ids=padded).logits.flatten(0, 1)[rows]
        h = enc.forward_reference(padded).flatten(0, 1)
        torch.testing.assert_close(head(h, rows=rows), hf_logits, rtol=1e-5, atol=1e-5)
        # transform_rows + decoder_weight: what a chunked linear + cross-entropy uses
        t = head.transform_rows(h, rows)
        torch.testing.assert_close(t @ head.decoder_weight.T + head.bias, hf_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_head_module_round_trips_through_save_encoder(tmp_path, tied):
    mlm = _hf_mlm(tmp_path, tied=tied, act="silu")
    enc, head = load_masked_lm(tmp_path / "ckpt")
    save_encoder(enc, tmp_path / "out", mlm_head=head)
    again = transformers.BertForMaskedLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(2, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, mlm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "out/config.json").read_text())["tie_word_embeddings"] == tied


def test_head_refuses_wrong_shapes_and_missing_tensors():
    cfg = tiny_config()
    head = MLMHead(cfg)
    sd = head.hf_state_dict()
    del sd["cls.predictions.transform.dense.bias"]
    with pytest.raises(ValueError, match=r"lacks \['cls.predictions.transform.dense.bias'\]"):
        MLMHead(cfg).load_hf_state_dict(sd)
    sd = head.hf_state_dict()
    sd["cls.predictions.bias"] = sd.pop("cls.predictions.decoder.bias")[:5]
    with pytest.raises(ValueError, match="cls.predictions.bias has shape"):
        MLMHead(cfg).load_hf_state_dict(sd)
    with pytest.raises(ValueError, match="cannot tie"):
        MLMHead(cfg, tied_to=torch.nn.Embedding(5, 48))


def test_masked_lm_needs_a_head(tmp_path):
    bare = transformers.BertModel(transformers.BertConfig(**tiny_config().to_hf_dict()), add_pooling_layer=False)
    bare.save_pretrained(tmp_path / "bare")
    load_encoder(tmp_path / "bare")  # the encoder alone loads
    with pytest.raises(InputFileError, match="no MLM head"):
        load_masked_lm(tmp_path / "bare")


def test_registry_picks_families_by_config():
    assert registry.family_of({"model_type": "bert", "hidden_act": "relu"}).name == "bert"
    assert registry.family_of({"hidden_size": 8}).name == "bert"  # Geneformer V1's config has no model_type
    assert registry.family_of({"model_type": "bert", "use_values": True}).name == "genecompass"
    with pytest.raises(InputFileError, match="'llama' is not a supported model family"):
        registry.family_of({"model_type": "llama"})


def test_genecompass_checkpoint_is_routed_to_its_loader(tmp_path, shared_dir):
    src = shared_dir / "genecompass_fixture" / "model"
    if not src.is_dir():
        pytest.skip("GeneCompass fixture not found")
    shutil.copytree(src, tmp_path / "gc")
    try:
        import scfm_fast.model.genecompass  # noqa: F401
    except ImportError:
        with pytest.raises(InputFileError, match="a GeneCompass checkpoint"):
            load_encoder(tmp_path / "gc")
    else:  # the GeneCompass family is in: it loads, and not as a plain BERT encoder
        from scfm_fast.model.bert import BertEncoderModel

        assert type(load_encoder(tmp_path / "gc")) is not BertEncoderModel


def test_register_family_hook(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "FAMILIES", dict(registry.FAMILIES))
    seen = []
    registry.register_family("toy", detector=lambda c: c.get("toy", False),
                             loader=lambda p, **kw: seen.append((p, kw)) or "toy-model", before="genecompass")
    assert list(registry.FAMILIES)[0] == "toy"
    (tmp_path / "t").mkdir()
    (tmp_path / "t/config.json").write_text(json.dumps({"toy": True}))
    assert load_encoder(tmp_path / "t", dtype=torch.float32) == "toy-model"
    assert seen[0][1] == {"device": None, "dtype": torch.float32, "return_head": False}
