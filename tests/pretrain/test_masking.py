"""Masking statistics (Geneformer / HF collator semantics) and independence from batching."""

from __future__ import annotations

import numpy as np

from scfm_fast.pretrain.data import Corpus, make_batch, plan_epoch, rank_step
from scfm_fast.pretrain.masking import Masker, protected_ids
from tests.pretrain._store import random_cells, write_dictionary, write_store

SPEC = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}


def test_selection_rate_and_80_10_10_split_over_a_million_tokens():
    V = 20_000
    m = Masker(vocab_size=V, mask_id=1, protected=protected_ids(SPEC, protect_special=False), seed=3)
    rng = np.random.default_rng(0)
    n_tok = n_sel = n_mask = n_rand = n_keep = n_special_sel = 0
    for cell in range(500):
        tok = np.concatenate([[2], rng.integers(4, V, 2046), [3]])
        out, pos, orig = m(tok, epoch=0, sample=cell)
        n_tok += tok.size
        n_sel += pos.size
        n_mask += int((out[pos] == 1).sum())
        changed = (out[pos] != 1) & (out[pos] != orig)
        n_keep += int((out[pos] == orig).sum())
        n_rand += int(changed.sum())
        n_special_sel += int(np.isin(orig, [2, 3]).sum())
        assert (out[np.setdiff1d(np.arange(tok.size), pos)] == tok[np.setdiff1d(np.arange(tok.size), pos)]).all()
    assert n_tok >= 1_000_000
    assert abs(n_sel / n_tok - 0.15) <= 0.002
    # a random id equal to the original (1 in V) counts as kept: the 10/10 split is within 1/V of exact
    assert abs(n_mask / n_sel - 0.8) <= 0.005
    assert abs(n_rand / n_sel - 0.1) <= 0.005 and abs(n_keep / n_sel - 0.1) <= 0.005
    assert n_special_sel > 0  # <cls>/<eos> are eligible by default, as in Geneformer


def test_protect_special_and_pad_mask_never_selected():
    m = Masker(vocab_size=50, mask_id=1, protected=protected_ids(SPEC, protect_special=True), prob=0.9)
    assert m.protected == (0, 1, 2, 3)
    for cell in range(200):
        tok = np.array([2, 0, 1, 5, 6, 7, 3])
        _, pos, orig = m(tok, epoch=1, sample=cell)
        assert not np.isin(orig, [0, 1, 2, 3]).any() and set(pos.tolist()) <= {3, 4, 5}
    loose = protected_ids(SPEC, protect_special=False)
    assert loose == (0, 1)


def _masks(corpus, masker, *, world, batch_tokens):
    train = np.ones(len(corpus), bool)
    plan = plan_epoch(corpus, train, weights=[1], seed=0, epoch=4, batch_tokens=batch_tokens, per_step=world)
    got = {}
    for st in range(plan.n_steps):
        for r in range(world):
            for samples in rank_step(corpus, plan, st, rank=r, world_size=world):
                b = make_batch(corpus, masker, samples, epoch=4)
                ids, cu = b.packed.input_ids.numpy(), b.packed.cu_seqlens.numpy()
                for j, s in enumerate(samples):
                    got[int(s)] = ids[cu[j]:cu[j + 1]].tolist()
    return got


def test_masks_do_not_depend_on_world_size_or_token_budget(tmp_path):
    d = write_dictionary(tmp_path / "d.pkl", 200)
    corpus = Corpus([write_store(tmp_path / "s", random_cells(60, vocab_size=200), dictionary=d)], max_len=64)
    m = Masker(vocab_size=200, mask_id=1, protected=(0, 1), seed=9)
    ref = _masks(corpus, m, world=1, batch_tokens=128)
    assert len(ref) == 60 and any(1 in v for v in ref.values())
    assert _masks(corpus, m, world=2, batch_tokens=128) == ref
    assert _masks(corpus, m, world=1, batch_tokens=300) == ref
    other_epoch = {s: m(corpus.tokens(s), epoch=5, sample=s)[0].tolist() for s in ref}
    assert other_epoch != ref
