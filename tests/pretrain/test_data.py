"""Epoch plan: shuffle, megabatch packing, rank sharding, dataset weights; corpus checks."""

from __future__ import annotations

import numpy as np
import pytest

from scfm_fast._errors import StoreError, UsageError
from scfm_fast.pretrain.data import Corpus, Prefetcher, make_batch, plan_epoch, rank_step, split_eval
from scfm_fast.pretrain.masking import Masker
from scfm_fast.store.cells import CellSource
from tests.pretrain._store import random_cells, write_dictionary, write_store


@pytest.fixture
def two_stores(tmp_path):
    d = write_dictionary(tmp_path / "dict.pkl", 300)
    a = write_store(tmp_path / "a", random_cells(120, vocab_size=300, seed=1), dictionary=d)
    b = write_store(tmp_path / "b", random_cells(50, vocab_size=300, lo=30, hi=90, seed=2), dictionary=d)
    return [a, b]


def test_startup_reads_lengths_only(two_stores, monkeypatch):
    def no_tokens(self, *a, **k):
        raise AssertionError("tokens were read while planning")

    for name in ("take", "take_packed", "__getitem__"):
        monkeypatch.setattr(CellSource, name, no_tokens)
    corpus = Corpus(two_stores, max_len=128)
    train, _ = split_eval(corpus, fraction=0.1, seed=0)
    plan = plan_epoch(corpus, train, weights=[1, 1], seed=0, epoch=0, batch_tokens=256, per_step=2)
    assert plan.n_steps > 0 and len(corpus) == 170
    np.testing.assert_array_equal(corpus.lengths[:120], [len(c) for c in random_cells(120, vocab_size=300, seed=1)])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_cell_once_per_epoch_across_ranks_with_balanced_tokens(two_stores, world):
    corpus = Corpus(two_stores, max_len=128)
    train, ev = split_eval(corpus, fraction=0.1, seed=3)
    assert ev.size == 17 and not train[ev].any()
    plan = plan_epoch(corpus, train, weights=[1, 1], seed=3, epoch=0, batch_tokens=300, per_step=2 * world)
    seen, imbalance = [], []
    for st in range(plan.n_steps):
        per_rank = [rank_step(corpus, plan, st, rank=r, world_size=world) for r in range(world)]
        assert all(len(x) == 2 for x in per_rank)  # two micro-batches each, padded with empty ones at the end
        toks = [sum(int(corpus.lengths[b].sum()) for b in x) for x in per_rank]
        for x in per_rank:
            for b in x:
                assert b.size == 0 or corpus.lengths[b].sum() <= 300 or b.size == 1
                seen.extend(b.tolist())
        if st < plan.n_steps - 1:
            imbalance.append((max(toks) - min(toks)) / max(toks))
    assert sorted(seen) == sorted(np.flatnonzero(train).tolist())  # each training cell exactly once
    if world > 1:
        assert np.mean(imbalance) < 0.15  # greedy packing to a budget + balanced dealing


def test_epochs_shuffle_differently_and_reproducibly(two_stores):
    corpus = Corpus(two_stores, max_len=128)
    train = np.ones(len(corpus), bool)
    kw = dict(weights=[1, 1], seed=0, batch_tokens=256, per_step=1)
    e0, e0b, e1 = (plan_epoch(corpus, train, epoch=e, **kw) for e in (0, 0, 1))
    assert all(np.array_equal(x, y) for x, y in zip(e0.batches, e0b.batches))
    assert np.concatenate(e0.batches).tolist() != np.concatenate(e1.batches).tolist()
    # packed: a batch holds cells of similar length (megabatch sorting), never over budget unless alone
    for b in e0.batches:
        assert corpus.lengths[b].sum() <= 256 or b.size == 1


def test_dataset_weights(two_stores):
    corpus = Corpus(two_stores, max_len=128)
    train = np.ones(len(corpus), bool)
    plan = plan_epoch(corpus, train, weights=[0.5, 2.0], seed=0, epoch=0, batch_tokens=256, per_step=1)
    s = np.concatenate(plan.batches)
    cells = s % len(corpus)
    assert (cells < 120).sum() == 60 and np.unique(cells[cells < 120]).size == 60
    assert (cells >= 120).sum() == 100 and np.bincount(cells[cells >= 120] - 120).tolist() == [2] * 50
    assert np.unique(s).size == s.size  # the two draws of a cell are distinct samples (distinct masks)


def test_packed_batches_have_no_padding(two_stores):
    corpus = Corpus(two_stores, max_len=128)
    m = Masker(vocab_size=300, mask_id=1, protected=(0, 1))
    b = make_batch(corpus, m, np.array([3, 130, 7]), epoch=0)
    assert b.packed.input_ids.numel() == int(corpus.lengths[[3, 130, 7]].sum())
    assert b.packed.cu_seqlens.tolist()[-1] == b.packed.input_ids.numel()


def test_prefetcher_yields_the_plan_in_order(two_stores):
    corpus = Corpus(two_stores, max_len=128)
    train = np.ones(len(corpus), bool)
    plan = plan_epoch(corpus, train, weights=[1, 1], seed=0, epoch=0, batch_tokens=256, per_step=1)
    m = Masker(vocab_size=300, mask_id=1, protected=(0, 1))
    it = Prefetcher(corpus, m, iter([(0, plan)]), start_step=2, rank=0, world_size=1)
    got = list(it)
    assert [st for _, st, _ in got] == list(range(2, plan.n_steps))
    assert got[0][2][0].n_cells == plan.batches[2].size



def test_prefetcher_close_stops_and_joins_its_thread(two_stores):
    """A run stops long before the plan ends: close() must leave no thread behind (one still inside a torch op
    at interpreter exit aborts the process with SIGABRT, failing a finished torchrun run)."""
    corpus = Corpus(two_stores, max_len=128)
    train = np.ones(len(corpus), bool)
    plan = plan_epoch(corpus, train, weights=[1, 1], seed=0, epoch=0, batch_tokens=64, per_step=1)
    m = Masker(vocab_size=300, mask_id=1, protected=(0, 1))
    plans = ((e, plan) for e in range(1000))  # far more work than one step: the thread is busy or blocked
    it = Prefetcher(corpus, m, plans, start_step=0, rank=0, world_size=1, depth=1)
    next(it)
    it.close()
    assert not it._t.is_alive()


def test_corpus_refuses_long_cells_unless_truncate_and_empty_stores(tmp_path, two_stores):
    with pytest.raises(UsageError, match=r"has \d+ tokens but the model has 50 positions.*--truncate"):
        Corpus(two_stores, max_len=50)
    c = Corpus(two_stores, max_len=50, truncate=True)
    assert c.lengths.max() == 50 and c.tokens(int(np.argmax(c.lengths))).size == 50
    d = write_dictionary(tmp_path / "d2.pkl", 300)
    with pytest.raises(StoreError, match="no cell to write"):  # a 0-cell dataset is never marked complete
        write_store(tmp_path / "empty", [], dictionary=d)
    with pytest.raises(StoreError, match="unfinished"):  # ... and what it left is refused
        Corpus([tmp_path / "empty"], max_len=50)
