"""Tokenizer throughput and memory: compiled core vs Numba vs NumPy reference, and the streaming pipeline.

Input: real PBMC cells (the bundled 200-cell 10x v3 file) resampled with replacement to N cells and
written as an AnnData-Zarr store (CSR X, written in streaming blocks), plus a 10x larger one to show
that the pipeline's peak memory does not grow with the number of cells.

Run:  python benchmarks/tokenize.py [--cells 20000] [--scale 10] [--threads 1 2]
Each measurement runs in a fresh subprocess so peak RSS is its own.
"""

from __future__ import annotations

import os
import sys

# This file's name shadows the standard library's ``tokenize`` (imported by inspect, linecache...)
# when run as a script: drop the script's folder from sys.path before anything else is imported.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import importlib.util
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

_spec = importlib.util.spec_from_file_location("_harness", os.path.join(_HERE, "_harness.py"))
_harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_harness)
write_results = _harness.write_results

DEMO = Path(__file__).resolve().parents[1] / "scfm_fast" / "data" / "demo" / "pbmc_200cells.h5ad"


def make_zarr(path: Path, n_cells: int, *, seed: int = 0, block: int = 5000) -> None:
    """Resample real cells into an AnnData-Zarr store with a CSR X, block by block (bounded memory)."""
    import anndata as ad
    import scipy.sparse as sp
    import zarr
    from anndata.io import write_elem

    src = ad.read_h5ad(DEMO)
    m = sp.csr_matrix(np.asarray(src.X, dtype=np.float32))
    rng = np.random.default_rng(seed)
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    write_elem(root, "var", src.var[[]])
    rows = rng.integers(0, m.shape[0], n_cells)
    nnz_per = np.diff(m.indptr)[rows]
    total = int(nnz_per.sum())
    X = root.create_group("X")
    X.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [n_cells, m.shape[1]]})
    chunk = 1 << 20
    data = X.create_array("data", shape=(total,), chunks=(chunk,), dtype=np.float32)
    indices = X.create_array("indices", shape=(total,), chunks=(chunk,), dtype=np.int32)
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(nnz_per, out=indptr[1:])
    X.create_array("indptr", shape=(n_cells + 1,), chunks=(1 << 18,), dtype=np.int64)[:] = indptr
    for s in range(0, n_cells, block):
        b = m[rows[s:s + block]]
        data[indptr[s]:indptr[min(s + block, n_cells)]] = b.data
        indices[indptr[s]:indptr[min(s + block, n_cells)]] = b.indices
    import pandas as pd

    obs = pd.DataFrame({"n_counts": np.asarray(src.obs["n_counts"])[rows]},
                       index=[f"c{i}" for i in range(n_cells)])
    write_elem(root, "obs", obs)
    root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})


def _child(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    import resource

    if args.child == "core":
        import anndata as ad
        import scipy.sparse as sp

        from scfm_fast.tokenizer.rank import tokenize_rank
        from scfm_fast.vocab import GeneVocab, load_gene_name_map, resolve_genes

        src = ad.read_h5ad(DEMO)
        vocab = GeneVocab.load()
        col, _ = resolve_genes(src.var_names, vocab, gene_name_map=load_gene_name_map())
        m = sp.csr_matrix(np.asarray(src.X, dtype=np.float32))
        rows = np.random.default_rng(0).integers(0, m.shape[0], args.n)
        chunk = m[rows]
        kw = dict(col_token=col, token_median=vocab.token_median, max_len=2048,
                  totals=np.asarray(src.obs["n_counts"], dtype=np.float64)[rows])
        tokenize_rank(chunk[:50].indptr, chunk[:50].indices, chunk[:50].data, **{**kw, "totals": kw["totals"][:50]},
                      backend=args.backend, n_threads=args.threads)  # warm-up / JIT
        t0 = time.perf_counter()
        tokenize_rank(chunk.indptr, chunk.indices, chunk.data, **kw, backend=args.backend, n_threads=args.threads)
        dt = time.perf_counter() - t0
        out = {"cells": args.n, "seconds": dt}
    else:
        from scfm_fast.tokenizer.pipeline import tokenize_corpus

        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            man = tokenize_corpus(args.zarr, Path(d) / "out", backend=args.backend, n_threads=args.threads,
                                  chunk_size=args.chunk_size, progress_bar=False)
            dt = time.perf_counter() - t0
        out = {"cells": man["summary"]["n_cells_in"], "seconds": dt}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def run_child(**kw) -> dict:
    cmd = [sys.executable, __file__]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ)
    # children import the scfm_fast of this checkout, installed or not
    env["PYTHONPATH"] = os.pathsep.join([str(Path(_HERE).parent), env.get("PYTHONPATH", "")])
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=20_000)
    ap.add_argument("--scale", type=int, default=10, help="size factor of the larger store (memory check)")
    ap.add_argument("--ref-cells", type=int, default=2_000, help="cells for the (slow) NumPy reference")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--chunk-size", type=int, default=10_000)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--no-write", action="store_true")
    # child-process arguments
    ap.add_argument("--child", choices=["core", "pipeline"], help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--zarr", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.threads = args.threads[0]
        return _child(args)

    os.environ.setdefault("SCFM_FAST_PROGRESS", "0")
    rows = []
    ref = run_child(child="core", backend="reference", n=args.ref_cells, threads=1)
    ref_rate = ref["cells"] / ref["seconds"]
    rows.append({"stage": "core (in-memory CSR)", "backend": "reference (numpy)", "threads": 1,
                 "cells": ref["cells"], "cells_per_s": ref_rate, "x_reference": 1.0,
                 "peak_rss_mb": ref["peak_rss_mb"]})
    for backend in ("cpp", "numba"):
        for t in args.threads:
            r = run_child(child="core", backend=backend, n=args.cells, threads=t)
            rate = r["cells"] / r["seconds"]
            rows.append({"stage": "core (in-memory CSR)", "backend": backend, "threads": t, "cells": r["cells"],
                         "cells_per_s": rate, "x_reference": rate / ref_rate, "peak_rss_mb": r["peak_rss_mb"]})
    with tempfile.TemporaryDirectory(dir=args.workdir) as d:
        small, big = Path(d) / "small.zarr", Path(d) / "big.zarr"
        make_zarr(small, args.cells)
        p_ref = run_child(child="pipeline", backend="reference", zarr=small, threads=1,
                          chunk_size=args.chunk_size) if args.cells <= 20_000 else None
        pref_rate = p_ref["cells"] / p_ref["seconds"] if p_ref else float("nan")
        if p_ref:
            rows.append({"stage": "pipeline zarr->parquet", "backend": "reference (numpy)", "threads": 1,
                         "cells": p_ref["cells"], "cells_per_s": pref_rate, "x_reference": 1.0,
                         "peak_rss_mb": p_ref["peak_rss_mb"]})
        for t in args.threads:
            r = run_child(child="pipeline", backend="cpp", zarr=small, threads=t, chunk_size=args.chunk_size)
            rate = r["cells"] / r["seconds"]
            rows.append({"stage": "pipeline zarr->parquet", "backend": "cpp", "threads": t, "cells": r["cells"],
                         "cells_per_s": rate, "x_reference": rate / pref_rate, "peak_rss_mb": r["peak_rss_mb"]})
        if args.scale > 1:
            make_zarr(big, args.cells * args.scale, seed=1)
            t = max(args.threads)
            r = run_child(child="pipeline", backend="cpp", zarr=big, threads=t, chunk_size=args.chunk_size)
            rows.append({"stage": f"pipeline zarr->parquet ({args.scale}x cells)", "backend": "cpp", "threads": t,
                         "cells": r["cells"], "cells_per_s": r["cells"] / r["seconds"],
                         "x_reference": float("nan"), "peak_rss_mb": r["peak_rss_mb"]})
    for r in rows:
        print(f"{r['stage']:<38} {r['backend']:<18} threads={r['threads']}  {r['cells']:>8,} cells  "
              f"{r['cells_per_s']:>10,.0f} cells/s  x{r['x_reference']:>6.1f} vs reference  "
              f"peak RSS {r['peak_rss_mb']:,.0f} MiB")
    if not args.no_write:
        js, md = write_results("tokenize", rows, meta={"cells": args.cells, "scale": args.scale,
                                                       "chunk_size": args.chunk_size})
        print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
