"""Checkpoint layouts that users have: transformers' own saves (MLM, bare, classifiers, sharded, untied,
pytorch_model.bin) load with hidden states equal to ``BertModel``'s and round-trip through ``save_encoder``."""

from __future__ import annotations

import json

import pytest
import torch

from scfm_fast._errors import InputFileError
from scfm_fast.kernels.padding import cu_seqlens_from_lengths
from scfm_fast.model.checkpoint import load_encoder, save_encoder
from tests._helpers import init_like_bert

transformers = pytest.importorskip("transformers")
LENGTHS = [1, 9, 32, 3]


def _config(**kw):
    d = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
             hidden_act="relu", max_position_embeddings=32, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0)
    return transformers.BertConfig(**{**d, **kw})


def _batch(vocab):
    g = torch.Generator().manual_seed(0)
    cells = [torch.randint(2, vocab, (n,), generator=g) for n in LENGTHS]
    padded = torch.zeros(len(cells), max(LENGTHS), dtype=torch.long)
    for i, c in enumerate(cells):
        padded[i, :c.numel()] = c
    return torch.cat(cells), cu_seqlens_from_lengths(torch.tensor(LENGTHS)), max(LENGTHS), padded


def _assert_same_hidden_states(model, hf_bert):
    ids, cu, m, padded = _batch(hf_bert.config.vocab_size)
    with torch.no_grad():
        states = hf_bert.eval()(input_ids=padded, attention_mask=(padded != 0).long(),
                                output_hidden_states=True).hidden_states
        for layer in range(len(states)):
            want = torch.cat([states[layer][i, :n] for i, n in enumerate(LENGTHS)])
            assert (model.forward_varlen(ids, cu, m, layer=layer) - want).abs().max() <= 1e-4, layer


def _assert_same_logits(a, b):
    _, _, _, padded = _batch(a.config.vocab_size)
    with torch.no_grad():
        la, lb = (x.eval()(input_ids=padded, attention_mask=(padded != 0).long()).logits for x in (a, b))
    assert (la - lb).abs().max() <= 1e-4


def _save_bin_shards(model, d):
    """A sharded pytorch_model.bin as transformers 4.x wrote it (v5 only writes safetensors)."""
    model.config.save_pretrained(d)
    sd = model.state_dict()
    keys = list(sd)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, d / name)
        weight_map.update(dict.fromkeys(part, name))
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_pytorch_model_bin_head_round_trips(tmp_path):
    # Geneformer V1 ships pytorch_model.bin: torch.save keeps tied tensors sharing storage, which
    # safetensors refused when save_encoder wrote the head back
    mlm = init_like_bert(transformers.BertForMaskedLM(_config()))
    mlm.config.save_pretrained(tmp_path / "bin")
    torch.save(mlm.state_dict(), tmp_path / "bin/pytorch_model.bin")
    model, head = load_encoder(tmp_path / "bin", return_head=True)
    _assert_same_hidden_states(model, mlm.bert)
    save_encoder(model, tmp_path / "out", mlm_head=head)
    _assert_same_logits(mlm, transformers.BertForMaskedLM.from_pretrained(tmp_path / "out"))


def test_untied_mlm_decoder_is_kept(tmp_path):
    mlm = init_like_bert(transformers.BertForMaskedLM(_config(tie_word_embeddings=False)))
    mlm.save_pretrained(tmp_path / "ckpt")
    model, head = load_encoder(tmp_path / "ckpt", return_head=True)
    save_encoder(model, tmp_path / "out", mlm_head=head)
    _assert_same_logits(mlm, transformers.BertForMaskedLM.from_pretrained(tmp_path / "out"))


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_sharded_checkpoints_load(tmp_path, layout):
    mlm = init_like_bert(transformers.BertForMaskedLM(_config()))
    d = tmp_path / "ckpt"
    if layout == "safetensors":
        mlm.save_pretrained(d, max_shard_size="20KB")
    else:
        d.mkdir()
        _save_bin_shards(mlm, d)
    index = next(d.glob("*.index.json"))
    model, head = load_encoder(d, return_head=True)
    _assert_same_hidden_states(model, mlm.bert)
    save_encoder(model, tmp_path / "out", mlm_head=head)
    _assert_same_logits(mlm, transformers.BertForMaskedLM.from_pretrained(tmp_path / "out"))
    shard = json.loads(index.read_text())["weight_map"]["bert.embeddings.word_embeddings.weight"]
    (d / shard).unlink()
    with pytest.raises(InputFileError, match=f"index.json: lists shard {shard}, which is missing"):
        load_encoder(d)


@pytest.mark.parametrize("cls", ["BertForSequenceClassification", "BertForTokenClassification"])
def test_fine_tuned_classifier_checkpoints_load(tmp_path, cls):
    # Geneformer's cell / gene classifiers: the encoder is used, the classifier (and pooler) ignored
    clf = init_like_bert(getattr(transformers, cls)(_config(num_labels=3)))
    clf.save_pretrained(tmp_path / "ckpt")
    model, head = load_encoder(tmp_path / "ckpt", return_head=True)
    assert head == {}
    _assert_same_hidden_states(model, clf.bert)


def test_relative_position_embeddings_are_refused(tmp_path):
    mlm = transformers.BertForMaskedLM(_config())
    mlm.config.position_embedding_type = "relative_key"
    mlm.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(InputFileError, match=r"config.json: position_embedding_type='relative_key' is not supported"):
        load_encoder(tmp_path / "ckpt")


def test_decoder_configs_are_refused(tmp_path):
    # is_decoder makes transformers' BertModel attend causally; running it bidirectionally would be silent
    transformers.BertForMaskedLM(_config(is_decoder=True)).save_pretrained(tmp_path / "ckpt")
    with pytest.raises(InputFileError, match="config.json: is_decoder"):
        load_encoder(tmp_path / "ckpt")


def test_config_without_hidden_act_means_gelu_as_in_transformers(tmp_path):
    mlm = init_like_bert(transformers.BertForMaskedLM(_config(hidden_act="gelu")))
    mlm.save_pretrained(tmp_path / "ckpt")
    cfg_file = tmp_path / "ckpt/config.json"
    cfg_file.write_text(json.dumps({k: v for k, v in json.loads(cfg_file.read_text()).items() if k != "hidden_act"}))
    _assert_same_hidden_states(load_encoder(tmp_path / "ckpt"), mlm.bert)
