"""``scfm perturb``: screens at scale, streamed to Parquet shards, resumable, multi-GPU.

Output directory layout::

    OUT/manifest.json                  run configuration, shard list, status, summary
    OUT/shards/part-SSSSSS.parquet     results of shard S (cells [S*N, (S+1)*N) of the token dataset)
    OUT/shards/part-SSSSSS.json        that shard's skipped targets and (approx mode) measured error
    OUT/perturbations.parquet          all shards merged (rank 0, once every shard exists)
    OUT/gene_stats.parquet, OUT/gene_stats.png   gene ranking vs a random-gene null (FDR) and its plot

Shards are written to a hidden temporary name and renamed into place, so a shard file exists only when
complete; ``--resume`` skips those, which gives no duplicate and no missing cells. Under ``torchrun``
(``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``) rank ``r`` runs shards ``s % WORLD_SIZE == r`` on
``--devices[LOCAL_RANK]`` (default ``cuda:LOCAL_RANK``); rank 0 merges when all shards are present. Several
``--devices`` without torchrun start one worker process per device with the same split.
"""

from __future__ import annotations

import argparse
from typing import Any

from .._runs import rank_world
from ._screen_run import _csv, parse_genes, work
from ._workers import _die_with_parent, _spawn_workers  # noqa: F401 (_die_with_parent: tests)

__all__ = ["parse_genes", "register", "run"]


def register(subparsers: Any) -> None:
    """Add the ``perturb`` subcommand to an argparse ``subparsers`` object."""
    from .plan import PERTURBATIONS
    from .screen import MODES

    p = subparsers.add_parser(
        "perturb", help="in-silico perturbation screen (delete / overexpress / inhibit / activate)",
        description="Perturb genes of every cell of a token dataset and stream cosine shifts to Parquet "
                    "shards in --out, then rank genes against a random-gene null (gene_stats.parquet + PNG).")
    p.add_argument("tokens", metavar="TOKENS_DIR", help="token dataset directory (Parquet shards)")
    p.add_argument("--model", required=True, help="Hugging Face BERT or GeneCompass checkpoint directory")
    p.add_argument("--perturb", default="delete", choices=PERTURBATIONS)
    p.add_argument("--genes", default="all",
                   help="'all', a comma-separated list (token ids, Ensembl IDs or symbols; A+B = a pair "
                        "perturbed together), or a file with one gene (or A+B) per line")
    p.add_argument("--anchor", help="perturb this gene together with each target (pairs)")
    p.add_argument("--combine", action="store_true", help="perturb the whole --genes list together")
    p.add_argument("--skip-absent", action="store_true",
                   help="overexpress: skip genes a cell lacks instead of inserting them at the front")
    p.add_argument("--rank-shift", type=float, default=0.25,
                   help="bin width (fraction of the cell's genes) for inhibit/activate; the gene moves one bin")
    p.add_argument("--rank-shift-quartiles", type=int, choices=[1, 2, 3],
                   help="Geneformer's perturb_rank_shift: move inhibit/activate genes by 1, 2 or 3 quartiles")
    p.add_argument("--layer", type=int,
                   help="readout layer: -1 last, -2 second-to-last, 0 embeddings, k encoder layer k (default: the "
                        "model family's own, -2 for Geneformer as its emb_layer=-1, -1 for GeneCompass as its "
                        "perturbation script)")
    p.add_argument("--emb-layer", type=int, choices=[0, -1],
                   help="Geneformer's numbering instead of --layer (not both): 0 = last layer, -1 = second-to-last")
    p.add_argument("--pooling", choices=["mean", "cls"],
                   help="cell readout rows (default: cls for a V2 dataset whose manifest records <cls>, else mean)")
    p.add_argument("--cell-readout", default="genes", choices=["genes", "pooled"],
                   help="with mean pooling, cos_sim = mean of the genes' own cosines (genes, Geneformer's) or the "
                        "cosine of the mean-pooled embeddings (pooled)")
    p.add_argument("--state-shift", default="all", choices=["all", "aligned"],
                   help="target/state shifts compare each cell's mean over all its genes (all, Geneformer today) "
                        "or over the genes present in both cells (aligned, Geneformer 2023)")
    p.add_argument("--mode", default="exact", choices=MODES, help="'approx' = KV-reuse approximation")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-tokens", type=int, help="tokens per batched forward")
    p.add_argument("--cells-per-shard", type=int, default=256)
    p.add_argument("--devices", type=_csv, default=[], help="e.g. cuda:0,cuda:1 (default: cuda if present)")
    p.add_argument("--max-cells", type=int, help="only the first N cells")
    p.add_argument("--gene-shifts", action="store_true", help="also store every remaining gene's cosine")
    p.add_argument("--target-embedding", help=".npy target state embedding (adds target_shift)")
    p.add_argument("--target-state", metavar="COLUMN=VALUE[,VALUE]",
                   help="target state = mean embedding of the cells of TOKENS_DIR with this metadata (e.g. "
                        "disease=nf), same model/layer/pooling; saved as OUT/target_embedding.npy; adds "
                        "target_shift")
    p.add_argument("--cell-states", metavar="JSON|FILE",
                   help='Geneformer\'s cell_states_to_model, inline JSON or a .json file: {"state_key": "disease", '
                        '"start_state": "dcm", "goal_state": "nf", "alt_states": ["hcm"]}; perturbs the start-state '
                        "cells and adds one shift_<state> column per goal/alt state")
    p.add_argument("--state-aggregate", default="mean", choices=["mean", "median"],
                   help="state embedding = mean (default) or median of its cells' embeddings")
    p.add_argument("--max-state-cells", type=int, default=1000, help="cells per state embedding (seeded sample)")
    p.add_argument("--state-seed", type=int, default=0, help="seed of the state cells' sample")
    p.add_argument("--filter", metavar="COLUMN=VALUE[,VALUE]",
                   help="perturb only the cells with this metadata (e.g. disease=dcm; several joined by ';'); "
                        "cell_index keeps their positions in TOKENS_DIR")
    p.add_argument("--special-tokens", help="comma-separated special token ids (default: the token dataset's, from its "
                        "manifest)")
    p.add_argument("--token-dictionary", help="token dictionary pickle (default: bundled Geneformer V1)")
    p.add_argument("--gene-name-map",
                   help="symbol -> Ensembl table (pickle, CSV/TSV or a bundled name such as ensembl-mouse; default: "
                        "the one the token dataset was tokenized with; on a joint human + mouse GeneCompass dataset "
                        "symbols resolve in each cell's own species)")
    p.add_argument("--orthologs", help="'mouse-to-human' or an ortholog table, to resolve mouse --genes as the "
                        "tokenizer did (default: the token dataset's own --orthologs, from its manifest)")
    p.add_argument("--no-attention-mask", action="store_true",
                   help="GeneCompass only: pad every cell and variant with (0, 0.0) genes to the model's positions "
                        "and let the pads attend, as GeneCompass's own perturbation script does (off by default)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="skip finished shards of an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="replace the results in --out")
    p.add_argument("--null-run", metavar="DIR",
                   help="test each gene against a separate null screen's results (an `scfm perturb` --out of "
                        "random genes) instead of against the rest of this screen")
    p.add_argument("--no-stats", action="store_true", help="skip gene_stats.parquet / the plot")
    p.add_argument("--merge-timeout", type=float, default=7 * 24 * 3600.0,
                   help="seconds rank 0 waits for other ranks' shards")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``scfm perturb`` (this rank's shards; rank 0 also merges and writes the statistics)."""
    _, world = rank_world()
    if world == 1 and len(args.devices) > 1:
        return _spawn_workers(args)
    return work(args)
