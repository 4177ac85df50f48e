"""CPU cost of the compiled rank core alone, and A/B of several builds of it in one process.

Real PBMC cells (the bundled demo) resampled to ``--cells`` (default 20,000; ~1,936 stored entries
per cell, ~95% of columns in the V1 vocabulary), ``tokenize_rank``'s core called directly on one
thread (``--threads``), CPU seconds (``time.process_time``: kernel time for page faults included)
per 20,000 cells for three cases: given totals, computed totals, given totals into a reused ``out``
buffer.  Builds given with ``--build NAME=PATH`` (e.g. a copy of ``_core*.so`` from before a change)
are loaded side by side and called in turn, round after round, so that load from other processes
hits every build alike: on a shared machine compare builds within one run, not across runs.  Every
build must return the same tokens (checked; the run fails otherwise).

Run:  python benchmarks/rank_core.py [--cells 20000] [--rounds 10] [--build old=/tmp/_core_old.so ...]
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py shadows the standard library's ``tokenize`` (imported by pandas): drop this
# script's folder from sys.path before anything else is imported.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import hashlib
import importlib.util
import statistics
import time
from pathlib import Path

import numpy as np

_spec = importlib.util.spec_from_file_location("_harness", os.path.join(_HERE, "_harness.py"))
_harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_harness)

DEMO = Path(__file__).resolve().parents[1] / "scfm_fast" / "data" / "demo" / "pbmc_200cells.h5ad"


def load_build(name: str, path: str):
    """A build of the core as its own module (the init symbol only depends on the last name part)."""
    spec = importlib.util.spec_from_file_location(f"rank_core_{name}._core", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pbmc_chunk(n_cells: int):
    """Resampled PBMC CSR chunk and the V1 arguments of the core (as tokenize_rank passes them)."""
    import anndata as ad
    import scipy.sparse as sp

    from scfm_fast.vocab import GeneVocab, load_gene_name_map, resolve_genes

    src = ad.read_h5ad(DEMO)
    vocab = GeneVocab.load()
    col, _ = resolve_genes(src.var_names, vocab, gene_name_map=load_gene_name_map())
    m = sp.csr_matrix(np.asarray(src.X, dtype=np.float32))
    rows = np.random.default_rng(0).integers(0, m.shape[0], n_cells)
    chunk = m[rows]
    totals = np.asarray(src.obs["n_counts"], dtype=np.float64)[rows]
    return chunk, np.ascontiguousarray(col, dtype=np.int32), np.ascontiguousarray(vocab.token_median,
                                                                                    dtype=np.float64), totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--build", action="append", default=[], metavar="NAME=PATH",
                    help="another build of scfm_fast/_core*.so to alternate with the current one")
    ap.add_argument("--no-write", action="store_true", help="print only; write nothing under results/")
    args = ap.parse_args()

    from scfm_fast import _ext
    from scfm_fast.tokenizer.rank import rank_output_bound

    _ext.require_core()
    builds = {"current": _ext.core}
    for spec in args.build:
        name, _, path = spec.partition("=")
        if not name or not path:
            raise SystemExit(f"--build wants NAME=PATH, got {spec!r}")
        builds[name] = load_build(name, path)

    chunk, col_token, token_median, totals = pbmc_chunk(args.cells)
    budget = 2048  # Geneformer V1: no special tokens
    out = np.empty(rank_output_bound(chunk.indptr, max_len=budget, n_special=0), dtype=np.int32)
    cases = {"given totals": (totals, None), "computed totals": (None, None), "given totals, out=": (totals, out)}
    times = {(b, c): [] for b in builds for c in cases}
    digests = {}
    for _ in range(args.rounds):
        for case, (tot, buf) in cases.items():
            for name, core in builds.items():
                t0 = time.process_time()
                tokens, offsets, _ = core.rank_tokenize(chunk.indptr, chunk.indices, chunk.data, col_token,
                                                        token_median, tot, budget, -1, -1, False, args.threads,
                                                        out=buf)
                times[name, case].append(time.process_time() - t0)
                digests.setdefault(name, hashlib.sha1(tokens.tobytes() + offsets.tobytes()).hexdigest())
                del tokens, offsets
    if len(set(digests.values())) != 1:
        raise SystemExit(f"builds disagree on the tokens: {digests}")

    scale = 20000 / args.cells
    rows = []
    for (name, case), ts in times.items():
        ts = sorted(ts)
        rows.append({"build": name, "case": case, "threads": args.threads, "cells": args.cells,
                     "cpu_s_per_20k_min": ts[0] * scale, "cpu_s_per_20k_q25": ts[len(ts) // 4] * scale,
                     "cpu_s_per_20k_median": statistics.median(ts) * scale,
                     "cpu_s_per_20k_mean": statistics.fmean(ts) * scale,
                     "cells_per_cpu_s_best": args.cells / ts[0]})
    for r in rows:
        print(f"{r['case']:20s} {r['build']:10s} CPU s per 20k cells: min {r['cpu_s_per_20k_min']:.3f}  "
              f"q25 {r['cpu_s_per_20k_q25']:.3f}  median {r['cpu_s_per_20k_median']:.3f}  "
              f"mean {r['cpu_s_per_20k_mean']:.3f}")
    if not args.no_write:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        paths = _harness.write_results("rank_core", rows, meta={"rounds": args.rounds, "load_average": load})
        print("wrote", *paths)


if __name__ == "__main__":
    sys.exit(main())
