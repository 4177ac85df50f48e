"""Masked-LM corruption with Geneformer's semantics (Hugging Face ``DataCollatorForLanguageModeling``).

Each eligible token is selected with probability ``p`` (Bernoulli); of the selected, 80% become
``<mask>``, 10% a random id uniform over the whole vocabulary and 10% stay. The random numbers of a
cell come from a counter-based generator (Philox) keyed by ``(seed, epoch, sample)`` alone, so a
cell's mask does not depend on batching, token budget, world size or resume.

GeneCompass cells also carry a value per token: :meth:`Masker.with_values` draws the same mask and sets the
value of masked and randomised positions to ``-1`` (kept positions keep theirs); the labels keep the
original ids and values.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

#: the epoch key of held-out (evaluation) cells: fixed masks, never equal to a training epoch
EVAL_EPOCH = 2**32 - 1


@dataclass(frozen=True)
class Masker:
    """How cells are corrupted.

    Parameters
    ----------
    vocab_size
        Random replacement ids are drawn from ``[0, vocab_size)``.
    mask_id
        Id of ``<mask>``.
    protected
        Ids never selected (``<pad>``, ``<mask>``; plus ``<cls>``/``<eos>`` with ``--protect-special``).
    prob
        Selection probability.
    seed
        Run seed.
    """

    vocab_size: int
    mask_id: int
    protected: tuple[int, ...]
    prob: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.prob < 1.0:
            msg = f"mask probability must be in (0, 1), got {self.prob}"
            raise ValueError(msg)

    def __call__(self, tokens: np.ndarray, *, epoch: int, sample: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Corrupt one cell.

        Returns
        -------
        (input ids int64, selected positions int64, original ids at those positions int64)
        """
        out, pos, _, orig = self._corrupt(tokens, epoch=epoch, sample=sample)
        return out, pos, orig

    def with_values(self, tokens: np.ndarray, values: np.ndarray, *, epoch: int,
                    sample: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Corrupt one GeneCompass cell: the same ids and selection as :meth:`__call__`, plus values.

        Returns
        -------
        (input ids int64, input values float32 (-1 at masked and randomised positions), selected positions
        int64, original ids there int64, original values there float32)
        """
        vals = np.asarray(values, dtype=np.float32)
        out, pos, changed, orig = self._corrupt(tokens, epoch=epoch, sample=sample)
        if vals.shape != out.shape:
            msg = f"cell of sample {sample}: {vals.size} values for {out.size} tokens"
            raise ValueError(msg)
        vin = vals.copy()
        vin[pos[changed]] = -1.0
        return out, vin, pos, orig, vals[pos]

    def _corrupt(self, tokens: np.ndarray, *, epoch: int,
                 sample: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(corrupted ids, selected positions, which of them were masked or randomised, original ids there)."""
        tok = np.asarray(tokens, dtype=np.int64)
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([self.seed, epoch, sample])))
        n = tok.size
        u_sel, u_kind = rng.random(n), rng.random(n)
        rand_ids = rng.integers(0, self.vocab_size, n)
        eligible = ~np.isin(tok, self.protected) if self.protected else np.ones(n, bool)
        pos = np.flatnonzero((u_sel < self.prob) & eligible)
        out = tok.copy()
        kind = u_kind[pos]
        out[pos[kind < 0.8]] = self.mask_id
        rnd = pos[(kind >= 0.8) & (kind < 0.9)]
        out[rnd] = rand_ids[rnd]
        return out, pos, kind < 0.9, tok[pos]


def protected_ids(special_tokens: dict[str, int], *, protect_special: bool) -> tuple[int, ...]:
    """Ids never selected: ``<pad>`` and ``<mask>``, and with ``protect_special`` every other special token."""
    names: Iterable[str] = special_tokens if protect_special else ("<pad>", "<mask>")
    return tuple(sorted(int(special_tokens[k]) for k in names if k in special_tokens))
