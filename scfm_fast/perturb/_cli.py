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
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from .._errors import InputFileError, StoreError, UsageError
from ._output import (
    _columns,
    _merge,
    _state_columns,
    _state_targets,
    _write_json,
    _write_shard,
)
from ._workers import _die_with_parent, _rank_world, _spawn_workers  # noqa: F401 (_die_with_parent: tests)

log = logging.getLogger(__name__)

_CONFIG_KEYS = ("tokens", "model", "perturb", "genes", "anchor", "combine", "rank_shift", "rank_shift_quartiles", "skip_absent",
                "layer", "pooling", "cell_readout", "state_shift", "mode", "dtype", "cells_per_shard", "max_cells", "gene_shifts", "target_embedding",
                "special_tokens", "filter", "target_state", "cell_states", "state_aggregate", "max_state_cells",
                "state_seed", "null_run", "token_dictionary", "gene_name_map",
                "orthologs")


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def register(subparsers: Any) -> None:
    """Add the ``perturb`` subcommand to an argparse ``subparsers`` object."""
    from .api import MODES
    from .plan import PERTURBATIONS

    p = subparsers.add_parser(
        "perturb", help="in-silico perturbation screen (delete / overexpress / inhibit / activate)",
        description="Perturb genes of every cell of a token dataset and stream cosine shifts to Parquet "
                    "shards in --out, then rank genes against a random-gene null (gene_stats.parquet + PNG).")
    p.add_argument("tokens", metavar="TOKENS_DIR", help="token dataset directory (Parquet shards)")
    p.add_argument("--model", required=True, help="Hugging Face BERT checkpoint directory")
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
    p.add_argument("--layer", type=int, default=-2, help="readout layer (default -2: second-to-last)")
    p.add_argument("--emb-layer", type=int, choices=[0, -1],
                   help="Geneformer's numbering instead of --layer: 0 = last layer, -1 = second-to-last")
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
    p.add_argument("--gene-name-map", help="symbol -> Ensembl pickle (default: bundled Geneformer V1)")
    p.add_argument("--orthologs", help="'mouse-to-human' or an ortholog table, to resolve mouse --genes as the "
                        "tokenizer did (default: the token dataset's own --orthologs, from its manifest)")
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


def parse_genes(spec: str) -> Any:
    """``all`` | ``A,B,C+D`` | a file with one entry per line -> the ``genes=`` argument."""
    if spec == "all":
        return "all"
    p = Path(spec)
    if not p.is_file() and ("/" in spec or p.suffix.lower() in (".txt", ".csv", ".tsv", ".list")):
        msg = f"{spec}: --genes file not found (give 'all', a comma-separated list or a file with one gene per line)"
        raise InputFileError(msg)
    items = [ln.strip() for ln in p.read_text().splitlines()] if p.is_file() else _csv(spec)
    items = [i for i in items if i and not i.startswith("#")]
    return [tuple(i.split("+")) if "+" in i else i for i in items]


def _config(args: argparse.Namespace, cells: Any) -> dict:
    cfg = {k: getattr(args, k, None) for k in _CONFIG_KEYS}
    cfg["tokens"] = str(Path(args.tokens).resolve())
    cfg["model"] = str(Path(args.model).resolve())
    for k in ("token_dictionary", "gene_name_map", "target_embedding", "orthologs"):
        if cfg.get(k) and not (k == "orthologs" and cfg[k] == "mouse-to-human"):
            cfg[k] = str(Path(cfg[k]).resolve())
    if args.genes != "all" and Path(args.genes).is_file():
        # the file's entries, not only its name: an edited gene file must not be resumed into the old run
        cfg["gene_list"] = json.loads(json.dumps(parse_genes(args.genes)))
    tm = cells.manifest
    if tm is not None:
        # a token dataset re-tokenized in place (same path, other cells or options) must not be resumed into
        cfg["tokens_config"] = {"config_hash": tm.get("config_hash"), "n_cells": tm.get("n_cells")}
    cfg["n_cells"] = len(cells)
    return cfg


def load_model(path: str, device: Any) -> Any:
    """The encoder of a Hugging Face BERT checkpoint directory."""
    from ..model.checkpoint import load_encoder

    return load_encoder(path, device=device)


def run(args: argparse.Namespace) -> int:
    """Run ``scfm perturb`` (this rank's shards; rank 0 also merges and writes the statistics)."""
    rank, world, _ = _rank_world()
    if world == 1 and len(args.devices) > 1:
        return _spawn_workers(args)
    return _work(args)


def _cells_of(args: argparse.Namespace) -> Any:
    """The run's cells: a :class:`~scfm_fast.store.cells.CellSource` view (tokens not read yet)."""
    import numpy as np

    from ..store.cells import open_cells
    from .states import parse_where

    src = open_cells(args.tokens)  # an unfinished dataset is refused: its result would look complete
    if args.cell_states:
        cells = _select(src, {args.cell_states["state_key"]: [args.cell_states["start_state"]]})
    elif args.filter:
        cells = _select(src, parse_where(args.filter))
    else:
        cells = src
    if args.max_cells is not None:  # only the first N cells (a screen of a few cells from a large corpus)
        cells = cells.subset(np.arange(min(len(cells), args.max_cells)))
    return cells


def _select(src: Any, where: dict) -> Any:
    from .states import select_source

    return select_source(src, where)


def _layout(args: argparse.Namespace) -> tuple[Any, Path, dict[int, Path], dict, int]:
    """The cells of the run and its shard layout: ``(cells, out, shard paths, config, n_shards)``."""
    cells = _cells_of(args)
    n_cells = len(cells)
    n_shards = max(1, math.ceil(n_cells / args.cells_per_shard))
    out = Path(args.out)
    names = {s: out / "shards" / f"part-{s:06d}.parquet" for s in range(n_shards)}
    return cells, out, names, _config(args, cells), n_shards


def _check_options(args: argparse.Namespace) -> None:
    for opt, v, low in (("--cells-per-shard", args.cells_per_shard, 1), ("--max-cells", args.max_cells, 0),
                        ("--batch-tokens", args.batch_tokens, 1)):
        if v is not None and v < low:
            msg = f"{opt} {v}: must be at least {low}"
            raise UsageError(msg)
    if args.target_embedding and args.target_state:
        msg = "give either --target-embedding or --target-state, not both"
        raise UsageError(msg)
    if args.cell_states:
        from .states import parse_cell_states

        given = [f for f, v in (("--filter", args.filter), ("--target-state", args.target_state),
                                ("--target-embedding", args.target_embedding)) if v]
        if given:
            msg = f"--cell-states chooses the cells and the states itself: drop {', '.join(given)}"
            raise UsageError(msg)
        if args.max_state_cells < 1:
            msg = f"--max-state-cells {args.max_state_cells}: must be at least 1"
            raise UsageError(msg)
        if isinstance(args.cell_states, str):  # parsed once: the manifest records the states, not a file name
            args.cell_states = parse_cell_states(args.cell_states)
    from .._devices import parse_device

    for d in args.devices:
        parse_device(d, flag="--devices")
    if args.target_embedding and not Path(args.target_embedding).is_file():
        msg = f"{args.target_embedding}: --target-embedding file not found (a .npy of one embedding)"
        raise InputFileError(msg)
    if args.null_run and not (Path(args.null_run) / "perturbations.parquet").is_file():
        msg = f"{args.null_run}: --null-run has no perturbations.parquet (give a finished `scfm perturb` --out)"
        raise InputFileError(msg)
    if args.emb_layer is not None:
        if args.layer != -2:
            msg = "give either --layer or --emb-layer (Geneformer's numbering), not both"
            raise UsageError(msg)
        from .api import layer_of

        args.layer, args.emb_layer = layer_of(args.layer, args.emb_layer), None
    if args.pooling is None:  # resolved once, so the manifest records what ran
        from ..store.cells import open_cells
        from ._inputs import default_pooling

        src = open_cells(args.tokens)
        special = [int(x) for x in _csv(args.special_tokens)] if args.special_tokens else src.special_token_ids
        args.pooling = default_pooling(src, special or [])


def _work(args: argparse.Namespace, *, merge: bool = True) -> int:
    import numpy as np
    import torch

    from .._progress import progress
    from ..vocab.targets import TargetResolver
    from ._inputs import check_cells
    from .api import run_engine
    from .states import parse_where, state_embedding

    rank, world, local = _rank_world()
    _check_options(args)
    cells, out, names, cfg, n_shards = _layout(args)
    TargetResolver.for_cells(cells, token_dictionary=args.token_dictionary)  # refuse another dictionary first
    n_cells = len(cells)
    if n_cells == 0 and args.max_cells != 0:
        msg = f"{args.tokens}: no cells{' matching --filter' if args.filter else ''}: nothing to perturb"
        raise InputFileError(msg)
    cps = int(args.cells_per_shard)
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    man_path = out / "manifest.json"
    if man_path.exists() and not args.overwrite:
        old = json.loads(man_path.read_text())
        if old.get("status") != "complete" and not any(shard_dir.glob("part-*.parquet")):
            old = {"config": cfg}  # a run that failed before its first shard holds nothing to protect
        if old.get("config") != cfg:
            diff = {k: (old.get("config", {}).get(k), v) for k, v in cfg.items()
                    if old.get("config", {}).get(k) != v}
            msg = f"{out}: holds a run with other settings {diff}; use another --out or --overwrite"
            raise StoreError(msg)
    mine = [s for s in range(n_shards) if s % world == rank]
    done = [s for s in mine if names[s].exists()]
    if done and not (args.resume or args.overwrite):
        msg = f"{out}: {len(done)} shards already exist; pass --resume to continue or --overwrite"
        raise StoreError(msg)
    if args.overwrite:
        for s in mine:
            names[s].unlink(missing_ok=True)
            names[s].with_suffix(".json").unlink(missing_ok=True)
        done = []
        if rank == 0:
            for f in ("perturbations.parquet", "gene_stats.parquet", "gene_stats.png", "target_embedding.npy",
                      "state_embeddings.npz", *(f"gene_stats_{c}.parquet" for c in _state_columns(args))):
                (out / f).unlink(missing_ok=True)
            # shards of an older layout (another --cells-per-shard) are never written by this run
            current = {p.name for p in names.values()} | {p.with_suffix(".json").name for p in names.values()}
            for f in shard_dir.glob("part-*"):
                if f.name not in current:
                    f.unlink()
    if rank == 0:
        _write_json(man_path, {"format": "scfm_fast.perturb/1", "config": cfg, "n_shards": n_shards,
                               "world_size": world, "status": "running"})
    if args.devices:
        device = torch.device(args.devices[local % len(args.devices)])
    else:
        device = torch.device(f"cuda:{local % torch.cuda.device_count()}" if torch.cuda.is_available()
                              else "cpu")
    if device.type == "cpu" and world > 1 and "OMP_NUM_THREADS" not in os.environ:
        # ranks on one machine share its cores; each using all of them oversubscribes (~3x slower)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    todo = [s for s in mine if s not in done]
    cols = _columns(args, file_index="file_index" in cells.column_names)
    if todo:
        model = load_model(args.model, device)
        special = [int(x) for x in _csv(args.special_tokens)] if args.special_tokens else cells.special_token_ids
        # before any shard runs (not at the first bad shard); tokens read part by part
        check_cells(cells, model, pooling=args.pooling, special=special or [], count_genes=False)
        target = _load_target(args.target_embedding) if args.target_embedding else None
        orthologs = args.orthologs or cells.orthologs
        if args.target_state:
            # every rank computes it (deterministic, and cheap next to the screen); rank 0 keeps a copy
            target, n_state = state_embedding(args.tokens, model, where=parse_where(args.target_state), layer=args.layer,
                                              pooling=args.pooling, special_token_ids=special,
                                              token_dictionary=args.token_dictionary,
                                              batch_tokens=args.batch_tokens, device=device, dtype=args.dtype,
                                              progress_bar=rank == 0)
            if rank == 0:
                tmp = out / ".target_embedding.npy.tmp"
                with open(tmp, "wb") as f:
                    np.save(f, target)
                os.replace(tmp, out / "target_embedding.npy")
                log.info("target state %s: mean embedding of %d cells", args.target_state, n_state)
        state_names = None
        if args.cell_states:
            target, state_names = _state_targets(args, args.tokens, model, special, device, out, rank)
        genes = parse_genes(args.genes)
        bar = progress(total=sum(min(cps, n_cells - s * cps) for s in todo), desc=f"perturb rank {rank}",
                       unit="cells", enabled=True)
        for s in todo:
            t0 = time.perf_counter()
            part = cells.subset(np.arange(s * cps, min(n_cells, (s + 1) * cps)))
            df = run_engine(part, model, engine=args.mode, with_file_index="file_index" in cols,
                            perturbation=args.perturb, genes=genes, anchor=args.anchor, combine=args.combine,
                            rank_shift=args.rank_shift, rank_shift_quartiles=args.rank_shift_quartiles,
                            layer=args.layer, pooling=args.pooling, cell_readout=args.cell_readout,
                            state_shift=args.state_shift, skip_absent=args.skip_absent,
                            batch_tokens=args.batch_tokens, device=device, dtype=args.dtype,
                            special_token_ids=special, token_dictionary=args.token_dictionary,
                            gene_name_map=args.gene_name_map, orthologs=orthologs, gene_shifts=args.gene_shifts,
                            target_embedding=target, target_names=state_names, progress_bar=False)
            skipped = df.attrs["skipped"]
            meta = {"shard": s, "n_cells": len(part), "n_rows": len(df), "seconds": time.perf_counter() - t0,
                    "skipped": skipped, "approx_error": df.attrs.get("approx_error")}
            _write_json(names[s].with_suffix(".json"), meta)
            _write_shard(df, names[s], cols)
            bar.update(len(part))
        bar.close()
    if rank != 0 or not merge:
        return 0
    _merge(out, names, cols, args, cfg, n_shards, world)
    return 0


def _load_target(path: str) -> Any:
    import numpy as np

    try:
        return np.load(path)
    except (OSError, ValueError) as e:
        msg = f"{path}: cannot read the --target-embedding .npy file ({e})"
        raise InputFileError(msg) from None


