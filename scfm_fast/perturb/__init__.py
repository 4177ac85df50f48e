"""In-silico perturbation: Geneformer's semantics, a batched exact engine and an opt-in approximate one.

* :func:`perturb_cells` - the engine (``mode="exact"`` or ``"approx"``), returns a DataFrame;
* :func:`perturb_cells_reference` - the oracle, one plain forward per variant;
* :func:`measure_approx_error` - approximate vs exact error (max |dcos|, Spearman of effect rankings);
* :func:`gene_stats` / :func:`plot_gene_stats` - rank genes by mean shift vs a random-gene null, with FDR;
* :func:`select_cells` / :func:`state_embedding` - cells of a state (by metadata) and a state's mean
  embedding, the target of disease -> healthy screens (``target_embedding=``).

Example (a delete-all screen of every cell of a token dataset)::

    from scfm_fast.model.checkpoint import load_encoder
    from scfm_fast.perturb import perturb_cells, gene_stats

    model = load_encoder("path/to/Geneformer-V1-6L", device="cuda")
    df = perturb_cells("tokens/", model, perturbation="delete", genes="all", dtype="bfloat16")
    stats = gene_stats(df)          # gene_token, mean_shift, pvalue, fdr, rank

or, streamed to Parquet shards with resume and several GPUs::

    scfm perturb tokens/ --model path/to/ckpt --perturb delete --genes all --out screen/
    torchrun --nproc-per-node 8 -m scfm_fast perturb tokens/ --model ckpt --out screen/ --resume

Semantics: :mod:`.plan`; result columns: :mod:`._results`; exactness argument: :mod:`.exact`; what the
approximation leaves out: :mod:`.approx`; null model: :mod:`.stats`; output layout: :mod:`._cli`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "perturb_cells": "scfm_fast.perturb.api",
    "perturb_cells_reference": "scfm_fast.perturb.api",
    "measure_approx_error": "scfm_fast.perturb.api",
    "gene_stats": "scfm_fast.perturb.stats",
    "plot_gene_stats": "scfm_fast.perturb.stats",
    "plan_cell": "scfm_fast.perturb.plan",
    "select_cells": "scfm_fast.perturb.states",
    "state_embedding": "scfm_fast.perturb.states",
    "PERTURBATIONS": "scfm_fast.perturb.plan",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        msg = f"module 'scfm_fast.perturb' has no attribute {name!r}"
        raise AttributeError(msg)
    return getattr(importlib.import_module(mod), name)
