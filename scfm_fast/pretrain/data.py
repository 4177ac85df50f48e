"""Pretraining data: memory-mapped token stores -> per-step, per-rank masked varlen micro-batches.

An epoch is a seeded shuffle of samples (a sample is one draw of a cell: dataset weights draw a
dataset's cells ``w`` times per epoch), cut into megabatches that are length-sorted and packed
greedily under a token budget. Micro-batches are grouped ``world_size * accum`` per optimiser step
and dealt to ranks with balanced token counts. The plan depends only on the lengths (read from the
stores' offsets), the seed, the epoch and the per-step micro-batch count, so any rank or a resumed run
recomputes it without reading tokens.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._errors import UsageError
from ..loader import PackedBatch, assign_to_ranks, megabatch_batches, pack_cells
from ..store.cells import open_cells
from .masking import Masker


class Corpus:
    """Several token stores as one memory-mapped corpus with global cell ids (dataset by dataset).

    Parameters
    ----------
    paths
        Complete token dataset directories, each opened through the shared cell-token source
        (:func:`~scfm_fast.store.cells.open_cells`: memory-mapped, lengths without reading tokens; an
        unfinished or empty dataset is refused there).
    max_len
        The model's positions: longer cells are refused, or cut to ``max_len`` with ``truncate``.
    truncate
        Cut over-long cells instead of refusing them.
    """

    def __init__(self, paths: Sequence[str | Path], *, max_len: int, truncate: bool = False) -> None:
        self.sources = [open_cells(p) for p in paths]
        lens = [np.asarray(s.lengths, dtype=np.int64) for s in self.sources]
        for p, ln in zip(paths, lens):
            long = np.flatnonzero(ln > max_len)
            if long.size and not truncate:
                msg = (f"{p}: cell {int(long[0])} has {int(ln[long[0]])} tokens but the model has {max_len} "
                       f"positions ({long.size} such cells); tokenize with --max-len {max_len} or pass --truncate")
                raise UsageError(msg)
        self.sizes = np.array([ln.size for ln in lens], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])
        self.lengths = np.minimum(np.concatenate(lens), max_len)
        self.max_len = max_len
        # GeneCompass corpora: every dataset carries values (and species); mixing families is refused
        has = {s.has_values for s in self.sources}
        if len(has) > 1:
            msg = (f"{list(map(str, paths))}: some datasets carry GeneCompass values and some do not; pretrain on "
                   "datasets of one model family")
            raise UsageError(msg)
        self.has_values = has.pop()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def tokens(self, cell: int) -> np.ndarray:
        d = int(np.searchsorted(self.starts, cell, side="right") - 1)
        return self.sources[d][int(cell - self.starts[d])][:self.max_len]

    def values(self, cell: int) -> tuple[np.ndarray, int]:
        """A GeneCompass cell's per-token values (cut like its tokens) and its species (0 when not recorded)."""
        d = int(np.searchsorted(self.starts, cell, side="right") - 1)
        src, i = self.sources[d], int(cell - self.starts[d])
        sp = src.species
        return src.take_values([i])[0][:self.max_len], 0 if sp is None else int(sp[i])


def split_eval(corpus: Corpus, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded hold-out: (training cell mask, evaluation cell ids); at least one training cell is kept."""
    train = np.ones(len(corpus), dtype=bool)
    if fraction <= 0:
        return train, np.zeros(0, dtype=np.int64)
    n_eval = min(len(corpus) - 1, max(1, round(fraction * len(corpus))))
    ev = np.sort(np.random.default_rng([seed, 7]).choice(len(corpus), size=n_eval, replace=False))
    train[ev] = False
    return train, ev


def epoch_samples(corpus: Corpus, train: np.ndarray, *, weights: Sequence[float], seed: int,
                  epoch: int) -> np.ndarray:
    """Sample ids of one epoch in shuffled order; sample ``s`` is cell ``s % len(corpus)``.

    A dataset of weight ``w`` contributes each of its training cells ``floor(w)`` times plus a seeded
    random ``w - floor(w)`` fraction of them (weight 1 everywhere: every cell exactly once).
    """
    n = len(corpus)
    rng = np.random.default_rng([seed, epoch])
    parts = []
    for d, w in enumerate(weights):
        cells = np.flatnonzero(train[corpus.starts[d]:corpus.starts[d + 1]]) + corpus.starts[d]
        whole, frac = int(w), w - int(w)
        parts += [cells + k * n for k in range(whole)]
        if frac > 0:
            pick = rng.choice(cells.size, size=round(frac * cells.size), replace=False)
            parts.append(np.sort(cells[pick]) + whole * n)
    samples = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return samples[rng.permutation(samples.size)]


@dataclass(frozen=True)
class EpochPlan:
    """One epoch's micro-batches (arrays of sample ids), grouped per optimiser step."""

    batches: list[np.ndarray]
    per_step: int  # micro-batches per optimiser step, all ranks together

    @property
    def n_steps(self) -> int:
        return -(-len(self.batches) // self.per_step)

    def step(self, i: int) -> list[np.ndarray]:
        return self.batches[i * self.per_step:(i + 1) * self.per_step]


def plan_epoch(corpus: Corpus, train: np.ndarray, *, weights: Sequence[float], seed: int, epoch: int,
               batch_tokens: int, per_step: int, megabatch_factor: int = 64) -> EpochPlan:
    """Shuffle, megabatch-sort and pack one epoch (see the module docstring)."""
    samples = epoch_samples(corpus, train, weights=weights, seed=seed, epoch=epoch)
    lens = corpus.lengths[samples % len(corpus)]
    mean = max(1.0, float(lens.mean())) if lens.size else 1.0
    mega = max(1, int(megabatch_factor * batch_tokens / mean))
    batches = [samples[b] for b in megabatch_batches(lens, max_tokens=batch_tokens, megabatch=mega)]
    # shuffle whole batches so that steps mix long- and short-cell batches across the epoch
    order = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
    return EpochPlan([batches[i] for i in order], per_step)


@dataclass
class MaskedBatch:
    """A packed, corrupted micro-batch and its MLM targets."""

    packed: PackedBatch
    label_pos: torch.Tensor  # rows of ``packed.input_ids`` that were selected
    labels: torch.Tensor  # their original ids
    n_cells: int
    values: torch.Tensor | None = None  # GeneCompass: input values (-1 where masked or randomised)
    species: torch.Tensor | None = None  # GeneCompass: per cell, 0 human / 1 mouse
    label_values: torch.Tensor | None = None  # GeneCompass: original values at label_pos

    def to(self, device: torch.device) -> MaskedBatch:
        """Move every tensor to ``device`` (in place; returns self)."""
        self.packed = self.packed.to(device)
        for name in ("label_pos", "labels", "values", "species", "label_values"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self


def make_batch(corpus: Corpus, masker: Masker, samples: np.ndarray, *, epoch: int) -> MaskedBatch:
    """Read, corrupt and pack the cells of ``samples`` (an empty array gives an empty batch)."""
    ids, pos, lab = [], [], []
    vin, vlab, species = [], [], []
    gc = getattr(corpus, "has_values", False)  # GeneCompass cells (a stand-in corpus may lack the attribute)
    off = 0
    for s in samples:
        tok = corpus.tokens(int(s % len(corpus)))
        if tok.size and int(tok.max()) >= masker.vocab_size:
            msg = (f"cell {int(s % len(corpus))}: token id {int(tok.max())} is outside the model's vocabulary "
                   f"of {masker.vocab_size}; was the dataset tokenized with this dictionary?")
            raise UsageError(msg)
        if gc:
            vals, sp = corpus.values(int(s % len(corpus)))
            x, v, p, y, yv = masker.with_values(tok, vals, epoch=epoch, sample=int(s))
            vin.append(v)
            vlab.append(yv)
            species.append(sp)
        else:
            x, p, y = masker(tok, epoch=epoch, sample=int(s))
        ids.append(x)
        pos.append(p + off)
        lab.append(y)
        off += x.size
    packed = pack_cells(ids) if ids else PackedBatch(torch.zeros(0, dtype=torch.long),
                                                     torch.zeros(1, dtype=torch.int32), 0,
                                                     torch.zeros(0, dtype=torch.long), np.zeros(0, np.int64))
    cat = (lambda a: torch.from_numpy(np.concatenate(a))) if ids else (lambda a: torch.zeros(0, dtype=torch.long))
    batch = MaskedBatch(packed, cat(pos), cat(lab), len(samples))
    if gc:
        fcat = (lambda a: torch.from_numpy(np.concatenate(a))) if ids else (lambda a: torch.zeros(0))
        batch.values, batch.label_values = fcat(vin), fcat(vlab)
        batch.species = torch.tensor(species, dtype=torch.long)
    return batch


def rank_step(corpus: Corpus, plan: EpochPlan, step: int, *, rank: int, world_size: int) -> list[np.ndarray]:
    """This rank's micro-batches of ``step``: token-balanced over ranks, padded with empty micro-batches
    where the epoch's last step has fewer than ``plan.per_step``."""
    group = plan.step(step)
    per_rank = plan.per_step // world_size
    toks = np.array([int(corpus.lengths[b % len(corpus)].sum()) for b in group], dtype=np.int64)
    mine = [group[i] for i in assign_to_ranks(toks, world_size=world_size, per_rank=per_rank)[rank]]
    return mine + [np.zeros(0, np.int64)] * (per_rank - len(mine))


class Prefetcher:
    """Background thread that builds this rank's masked micro-batches ahead of the training loop.

    Iterating yields ``(epoch, step_in_epoch, [MaskedBatch, ...])``; ``wait_s`` accumulates the time
    the consumer spent blocked on data.
    """

    def __init__(self, corpus: Corpus, masker: Masker, plans: Iterator[tuple[int, EpochPlan]], *, start_step: int,
                 rank: int, world_size: int, depth: int = 4) -> None:
        self.wait_s = 0.0
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._args = (corpus, masker, plans, start_step, rank, world_size)
        self._t = threading.Thread(target=self._run, daemon=True, name="scfm-pretrain-data")
        self._t.start()

    def _run(self) -> None:
        corpus, masker, plans, start, rank, world = self._args
        try:
            for epoch, plan in plans:
                for st in range(start, plan.n_steps):
                    if self._stop.is_set():
                        return
                    mine = rank_step(corpus, plan, st, rank=rank, world_size=world)
                    if not self._put((epoch, st, [make_batch(corpus, masker, b, epoch=epoch) for b in mine])):
                        return
                start = 0
            self._put(None)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer's thread
            self._put(e)

    def _put(self, item) -> bool:
        """Queue ``item`` unless the consumer has closed the loader (then ``False``)."""
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self):
        t0 = time.perf_counter()
        item = self._q.get()
        self.wait_s += time.perf_counter() - t0
        if item is None:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the thread and wait for it. It must not outlive the run: a daemon thread still inside a torch op
        at interpreter exit is ended by ``pthread_exit`` when it retakes the GIL, and that forced unwind through
        torch's C++ frames calls ``std::terminate`` -- a finished run would abort with SIGABRT (seen under
        torchrun)."""
        self._stop.set()
        self._t.join()
