"""``scfm perturb``'s output directory: shard files, their columns, the merge and its statistics.

Layout in :mod:`scfm_fast.perturb._cli`. Every file is written to a hidden temporary name and renamed
into place, so a file exists only when complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .._errors import StoreError

log = logging.getLogger(__name__)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _arrow_schema(df_columns: list[str]):
    import pyarrow as pa

    types = {"cell_index": pa.int64(), "file_index": pa.int32(), "perturbation": pa.string(), "gene_token": pa.int64(),
             "gene_tokens": pa.list_(pa.int64()), "ensembl_id": pa.string(), "gene_name": pa.string(),
             "n_genes": pa.int64(),
             "orig_rank": pa.int64(), "new_rank": pa.int64(), "cos_sim": pa.float64(), "shift": pa.float64(),
             "target_shift": pa.float64(), "gene_shift_tokens": pa.list_(pa.int32()),
             "gene_shift_cos": pa.list_(pa.float32())}
    return pa.schema([pa.field(c, types.get(c, pa.float64() if c.startswith("shift_") else None))
                      for c in df_columns])


def _columns(args: argparse.Namespace, *, file_index: bool = False) -> list[str]:
    cols = ["cell_index", *(["file_index"] if file_index else []), "perturbation", "gene_token", "gene_tokens",
            "ensembl_id", "gene_name", "n_genes", "orig_rank", "new_rank", "cos_sim", "shift"]
    if args.target_embedding or args.target_state:
        cols.append("target_shift")
    cols += _state_columns(args)
    if args.gene_shifts:
        cols += ["gene_shift_tokens", "gene_shift_cos"]
    return cols


def _state_columns(args: argparse.Namespace) -> list[str]:
    cs = getattr(args, "cell_states", None)
    if not cs:
        return []
    from .states import parse_cell_states

    d = parse_cell_states(cs) if isinstance(cs, str) else cs
    return [f"shift_{s}" for s in (d["goal_state"], *d["alt_states"])]


def _write_shard(df: Any, path: Path, cols: list[str]) -> None:
    """The shard's columns ``cols`` of ``df`` at ``path`` (the caller makes it atomic)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    df = df.copy()
    df.attrs = {}
    pq.write_table(pa.Table.from_pandas(df[cols], schema=_arrow_schema(cols), preserve_index=False), path)


def _merge(out: Path, parts: list[Path], cols: list[str], args: argparse.Namespace, cfg: dict) -> dict[str, Any]:
    """Merge the shard files ``parts`` into ``perturbations.parquet``, write the gene statistics; returns the
    run's summary (the caller records it in ``manifest.json``)."""
    import numpy as np
    import pyarrow.parquet as pq

    from .._runs import atomic_write
    from .stats import gene_stats, plot_gene_stats, summarize

    merged = out / "perturbations.parquet"
    n_rows = 0

    def write(tmp: Path) -> None:
        nonlocal n_rows
        with pq.ParquetWriter(tmp, _arrow_schema(cols)) as w:
            for p in parts:
                t = pq.read_table(p)
                n_rows += t.num_rows
                w.write_table(t)

    atomic_write(merged, write)
    summary: dict[str, Any] = {"n_rows": n_rows, "n_skipped": 0, "seconds": 0.0}
    errs = []
    for p in parts:  # one shard's record at a time: the skip lists grow with the corpus
        if p.with_suffix(".json").exists():
            m = json.loads(p.with_suffix(".json").read_text())
            summary["n_skipped"] += len(m["skipped"])
            summary["seconds"] += m["seconds"]
            if m.get("approx_error") and m["approx_error"]["n_variants"]:
                errs.append(m["approx_error"])
    if errs:
        rhos = [e["spearman_min"] for e in errs if np.isfinite(e["spearman_min"])]
        summary["approx_error"] = {"max_abs_dcos": max(e["max_abs_dcos"] for e in errs),
                                   "spearman_min": min(rhos) if rhos else None,
                                   "n_variants_checked": sum(e["n_variants"] for e in errs)}
    if not args.no_stats and n_rows:
        state_cols = _state_columns(args)
        df = pq.read_table(merged, columns=[c for c in ("gene_token", "ensembl_id", "gene_name", "shift", "target_shift",
                                                         *state_cols) if c in cols]).to_pandas()
        if (df["gene_token"] < 0).any():  # groups are keyed by their members (only then: a list per row)
            df["gene_tokens"] = pq.read_table(merged, columns=["gene_tokens"]).column(0).to_pylist()
        def null_of(col: str) -> Any:
            if not getattr(args, "null_run", None):
                return None
            path = Path(args.null_run) / "perturbations.parquet"
            if col not in pq.read_schema(path).names:
                msg = f"{path}: the --null-run has no {col!r} column to compare with (run it with the same states)"
                raise StoreError(msg)
            return pq.read_table(path, columns=[col]).column(0).to_numpy()

        if state_cols:
            # Geneformer's goal-state test: each gene's shifts toward a state vs all perturbations pooled
            # (rank-sum), BH FDR per state; gene_stats.parquet = the goal state
            for i, c in enumerate(state_cols):
                st_c = gene_stats(df, value=c, null=null_of(c))
                st_c.to_parquet(out / ("gene_stats.parquet" if i == 0 else f"gene_stats_{c}.parquet"), index=False)
                summary.setdefault("state_stats", {})[c] = summarize(st_c)
                if i == 0:
                    st = st_c
                    plot_gene_stats(st, out / "gene_stats.png", value=c)
        else:
            st = gene_stats(df, null=null_of("shift"))
            plot_gene_stats(st, out / "gene_stats.png")
            st.to_parquet(out / "gene_stats.parquet", index=False)
        summary["stats"] = summarize(st)
    msg = f"wrote {n_rows:,} perturbations of {cfg['n_cells']:,} cells to {merged}"
    if "stats" in summary:
        msg += (f"; {summary['stats']['n_significant']:,}/{summary['stats']['n_genes']:,} genes at FDR < 0.05 "
                f"in {out / 'gene_stats.parquet'}")
    if "approx_error" in summary:
        msg += f"; approx mode: max |dcos| vs exact = {summary['approx_error']['max_abs_dcos']:.2e}"
    if summary["n_skipped"]:
        # e.g. genes absent from every cell: an empty table must not pass silently as a finished screen
        msg += (f"; {summary['n_skipped']:,} (cell, target) skips (gene not in vocabulary / not expressed; listed "
                f"in {out / 'shards'}/part-*.json)")
    sys.stderr.write(msg + "\n")
    return summary


def _state_targets(args: argparse.Namespace, src: Path, model: Any, special: Any, device: Any, out: Path,
                   rank: int) -> tuple[Any, list[str]]:
    """Goal and alt state embeddings ``(S, H)`` and their column names; rank 0 saves them."""
    import numpy as np

    from .states import state_embedding

    cs = args.cell_states
    states = [cs["goal_state"], *cs["alt_states"]]
    embs, counts = [], []
    for st in states:
        # every rank computes them (deterministic, and cheap next to the screen)
        e, n = state_embedding(src, model, where={cs["state_key"]: [st]}, layer=args.layer, pooling=args.pooling,
                               special_token_ids=special, token_dictionary=args.token_dictionary,
                               batch_tokens=args.batch_tokens, device=device, dtype=args.dtype,
                               progress_bar=rank == 0, max_cells=args.max_state_cells, seed=args.state_seed,
                               aggregate=args.state_aggregate,
                               no_attention_mask=getattr(args, "no_attention_mask", False))
        embs.append(e)
        counts.append(n)
    if rank == 0:
        tmp = out / ".state_embeddings.npz.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, embeddings=np.stack(embs), states=np.asarray(states), n_cells=np.asarray(counts))
        os.replace(tmp, out / "state_embeddings.npz")
        log.info("cell states %s: %s embeddings of %s cells", states, args.state_aggregate, counts)
    return np.stack(embs), [f"shift_{s}" for s in states]
