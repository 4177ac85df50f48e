"""One ``scfm perturb`` run: its cells, options, config and shards over :class:`~scfm_fast._runs.PartitionedRun`.

The CLI (:mod:`._cli`) parses arguments into a namespace and calls :func:`work`; ``--devices`` workers
(:mod:`._workers`) call it too. Each shard is one :func:`~scfm_fast.perturb.screen.run_engine` call over a
view of the cells, so a shard's tokens are all a rank holds.
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

from .._errors import InputFileError, UsageError
from .._runs import rank_world
from ._output import _columns, _merge, _state_columns, _state_targets, _write_shard

log = logging.getLogger(__name__)

#: merged outputs in OUT (deleted by --overwrite; their presence means an earlier run left results)
OUTPUTS = ("perturbations.parquet", "gene_stats.parquet", "gene_stats.png", "target_embedding.npy",
           "state_embeddings.npz")

_CONFIG_KEYS = ("tokens", "model", "perturb", "genes", "anchor", "combine", "rank_shift", "rank_shift_quartiles", "skip_absent",
                "layer", "pooling", "cell_readout", "state_shift", "mode", "dtype", "cells_per_shard", "max_cells", "gene_shifts", "target_embedding",
                "special_tokens", "filter", "target_state", "cell_states", "state_aggregate", "max_state_cells",
                "state_seed", "null_run", "token_dictionary", "gene_name_map",
                "orthologs")


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


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
    if getattr(args, "no_attention_mask", False):  # recorded only when set: earlier runs' configs stay valid
        cfg["no_attention_mask"] = True
    return cfg


def load_model(path: str, device: Any) -> Any:
    """The encoder of a Hugging Face BERT checkpoint directory."""
    from ..model.checkpoint import load_encoder

    return load_encoder(path, device=device)


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
    # resolved once (the checkpoint's family gives the default), so the manifest records what ran and a
    # resumed run with the default compares equal to its first run
    from ..model.checkpoint import read_config_dict
    from ..model.registry import family_of
    from .screen import readout_layer

    family = family_of(read_config_dict(args.model), source=str(Path(args.model) / "config.json")).name
    args.layer, args.emb_layer = readout_layer(family, layer=args.layer, emb_layer=args.emb_layer), None
    if args.pooling is None:  # resolved once, so the manifest records what ran
        from ..store.cells import open_cells
        from ._inputs import default_pooling

        src = open_cells(args.tokens)
        special = [int(x) for x in _csv(args.special_tokens)] if args.special_tokens else src.special_token_ids
        args.pooling = default_pooling(src, special or [])


def work(args: argparse.Namespace, *, merge: bool = True, prepared: bool = False) -> int:
    """Run this rank's shards of ``scfm perturb``; rank 0 (``merge``) then waits for every shard and merges."""
    import torch

    from ..vocab.targets import TargetResolver

    rank, world = rank_world()
    local = int(os.environ.get("LOCAL_RANK", rank))
    _check_options(args)
    cells, out, _, cfg, n_shards = _layout(args)
    TargetResolver.for_cells(cells, token_dictionary=args.token_dictionary)  # refuse another dictionary first
    n_cells = len(cells)
    if n_cells == 0 and args.max_cells != 0:
        msg = f"{args.tokens}: no cells{' matching --filter' if args.filter else ''}: nothing to perturb"
        raise InputFileError(msg)
    job = _job(args, out, cfg, n_shards, rank, world)
    if not prepared:  # --devices workers: their parent prepared OUT (as rank 0) before starting them
        job.begin()
    if args.devices:
        device = torch.device(args.devices[local % len(args.devices)])
    else:
        device = torch.device(f"cuda:{local % torch.cuda.device_count()}" if torch.cuda.is_available()
                              else "cpu")
    threads = torch.get_num_threads()
    if device.type == "cpu" and world > 1 and "OMP_NUM_THREADS" not in os.environ:
        # ranks on one machine share its cores; each using all of them oversubscribes (~3x slower)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    try:  # a caller in this process (tests, notebooks) gets its own thread count back
        return _work_shards(args, cells, cfg, job, device, rank, merge=merge)
    finally:
        torch.set_num_threads(threads)


def _work_shards(args: argparse.Namespace, cells: Any, cfg: dict, job: Any, device: Any, rank: int, *,
                 merge: bool) -> int:
    """The shards of :func:`work` this rank runs, then (rank 0, ``merge``) the merge."""
    import numpy as np

    from .._progress import progress
    from ._inputs import check_cells
    from .screen import run_engine
    from .states import parse_where, state_embedding

    out, n_cells, cps = job.out, len(cells), int(args.cells_per_shard)
    todo = job.todo()
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
                                              progress_bar=rank == 0,
                                              no_attention_mask=getattr(args, "no_attention_mask", False))
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
                            target_embedding=target, target_names=state_names, progress_bar=False,
                            no_attention_mask=getattr(args, "no_attention_mask", False))
            skipped = df.attrs["skipped"]
            meta = {"shard": s, "n_cells": len(part), "n_rows": len(df), "seconds": time.perf_counter() - t0,
                    "skipped": skipped, "approx_error": df.attrs.get("approx_error")}
            job.write_part(s, lambda t, d=df: _write_shard(d, t, cols),
                           side={".json": lambda t, m=meta: t.write_text(json.dumps(m, indent=1, default=str))})
            bar.update(len(part))
        bar.close()
    if rank != 0 or not merge:
        return 0
    job.wait_all(timeout_s=args.merge_timeout)
    finish(job, args, cols, cfg)
    return 0


def finish(job: Any, args: argparse.Namespace, cols: list[str], cfg: dict) -> None:
    """Merge the parts (once, under the run's lock) and mark the run complete."""
    with job.merging() as mine:
        if mine:
            job.check_merge_ready()
            job.complete(summary=_merge(job.out, job.part_paths(), cols, args, cfg))


def _job(args: argparse.Namespace, out: Path, cfg: dict, n_shards: int, rank: int, world: int) -> Any:
    from .._runs import PartitionedRun

    outputs = [*OUTPUTS, *(f"gene_stats_{c}.parquet" for c in _state_columns(args))]
    return PartitionedRun(out, config=cfg, n_parts=n_shards, info_name="manifest.json", parts_dir="shards",
                          outputs=outputs, resume=args.resume, overwrite=args.overwrite, rank=rank, world=world,
                          command="scfm perturb",
                          info_extra={"format": "scfm_fast.perturb/1", "n_shards": n_shards, "world_size": world})


def _load_target(path: str) -> Any:
    import numpy as np

    try:
        return np.load(path)
    except (OSError, ValueError) as e:
        msg = f"{path}: cannot read the --target-embedding .npy file ({e})"
        raise InputFileError(msg) from None


