"""Presets, vocabulary from the data, optimiser groups and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from scfm_fast._errors import UsageError
from scfm_fast.pretrain.build import build_model, make_optimizer, make_scheduler, model_config
from scfm_fast.pretrain.presets import PRESETS, PretrainOptions


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_take_the_dataset_vocabulary_and_published_recipe(name):
    o = PretrainOptions(out="-", preset=name).resolved()
    cfg = model_config(o, vocab_size=1234, specials={"<pad>": 0, "<mask>": 1})
    assert cfg.vocab_size == 1234 and o.lr == PRESETS[name]["lr"] and o.schedule == PRESETS[name]["schedule"]
    assert cfg.hidden_dropout_prob == PRESETS[name]["dropout"]
    assert cfg.hidden_act == {"mouse-geneformer": "silu", "genecompass-base": "gelu"}.get(name, "relu")


def test_option_conflicts_are_refused():
    with pytest.raises(UsageError, match="exactly one of --preset"):
        PretrainOptions(out="-").resolved()
    with pytest.raises(UsageError, match="--max-steps or --epochs"):
        PretrainOptions(out="-", preset="mouse-geneformer", max_steps=1, epochs=1).resolved()
    with pytest.raises(UsageError, match="unknown --preset"):
        PretrainOptions(out="-", preset="nope").resolved()


def test_no_weight_decay_on_biases_and_layer_norm_and_tied_decoder_once():
    o = PretrainOptions(out="-", preset="geneformer-v1-6l", weight_decay=0.1).resolved()
    cfg = model_config(o, vocab_size=50, specials={"<pad>": 0, "<mask>": 1})
    cfg.num_hidden_layers = 1
    model, head = build_model(cfg, init=None)
    opt = make_optimizer(model, head, o, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and id(model.embeddings.word_embeddings.weight) in ids
    assert head.decoder.weight is model.embeddings.word_embeddings.weight


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_warms_up_then_decays_to_zero(schedule):
    o = PretrainOptions(out="-", config="x", lr=1.0, warmup=0.1, schedule=schedule).resolved()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sch = make_scheduler(opt, o, 100)
    lrs = []
    for _ in range(100):
        lrs.append(sch.get_last_lr()[0])
        opt.step()
        sch.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    mid = 0.5 if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * 0.5))
    assert lrs[55] == pytest.approx(mid) and lrs[-1] < 0.05
