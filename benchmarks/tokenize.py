"""Tokenizer throughput and memory: compiled core vs Numba vs NumPy reference, and file -> token dataset.

Input: real PBMC cells (the bundled 200-cell 10x v3 file) resampled with replacement to N cells and
written, in streaming blocks, as AnnData-Zarr v2 (blosc lz4), AnnData-Zarr v3 (zstd; also sharded, 8 chunks
per shard, as zarr announces for its default), h5ad
(uncompressed and gzip, CSR) and loom (dense genes x cells, gzip); plus ``--scale``x larger stores to
show that peak memory does not grow with the number of cells (loom only at N: its dense matrix is
33k genes x N cells).

End to end (``scfm tokenize``) runs both ways on all cores: ``threads=0`` is a single process
(pieces of each chunk read, ranked and written on overlapping threads, the core on all cores) and
``threads=N`` is ``--workers N`` (processes that each read, rank and write whole chunks; the default on N
cores). Each is reported as cells/s, CPU seconds of the parent and its workers, and peak RSS (``VmHWM``)
of the parent and of the largest worker, against the NumPy reference pipeline (``--backend reference``,
on the Zarr v2 store). ``rss_vs_small``: the larger store's peak in one process over the smaller one's
(memory bounded by the chunk size). The larger stores also run with shard files written through the
page cache (``SCFM_FAST_DIRECT_IO=0``) instead of ``O_DIRECT``. Per-stage rows give user+system CPU
seconds per 20,000 cells for read (decode to CSR), rank (core, one thread, plus the chunk's table) and
write (Parquet + packed part), measured one stage at a time: less sensitive to other load on the
machine than wall-clock rates.

Run:  python benchmarks/tokenize.py [--cells 20000] [--scale 10] [--threads 1 2] [--formats ...]
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
import shutil
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


def make_zarr(path: Path, n_cells: int, *, seed: int = 0, block: int = 5000, zarr_format: int = 2,
              sharded: bool = False) -> None:
    """Resample real cells into an AnnData-Zarr store with a CSR X, block by block (bounded memory);
    v2 with zarr's default blosc lz4, v3 with its default zstd (``sharded``: ``data``/``indices`` in shards
    of 8 chunks)."""
    import zarr
    from anndata.io import write_elem

    src, m, rows = _resampled(n_cells, seed)
    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    write_elem(root, "var", src.var[[]])
    nnz_per = np.diff(m.indptr)[rows]
    total = int(nnz_per.sum())
    X = root.create_group("X")
    X.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [n_cells, m.shape[1]]})
    chunk = 1 << 20
    kw = {"shards": (8 * chunk,)} if sharded else {}
    data = X.create_array("data", shape=(total,), chunks=(chunk,), dtype=np.float32, **kw)
    indices = X.create_array("indices", shape=(total,), chunks=(chunk,), dtype=np.int32, **kw)
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


FORMATS = ("zarr2", "zarr3", "zarr3-sharded", "h5ad", "h5ad-gzip", "loom")
_SUFFIX = {"zarr2": ".zarr", "zarr3": ".zarr", "zarr3-sharded": ".zarr", "h5ad": ".h5ad", "h5ad-gzip": ".h5ad",
           "loom": ".loom"}


def _resampled(n_cells: int, seed: int):
    import anndata as ad
    import scipy.sparse as sp

    src = ad.read_h5ad(DEMO)
    m = sp.csr_matrix(np.asarray(src.X, dtype=np.float32))
    rows = np.random.default_rng(seed).integers(0, m.shape[0], n_cells)
    return src, m, rows


def make_h5ad(path: Path, n_cells: int, *, seed: int = 0, gzip: bool = False, block: int = 5000) -> None:
    """The same resampled cells as :func:`make_zarr`, as an h5ad with a CSR X (optionally gzip)."""
    import h5py
    import pandas as pd
    from anndata.io import write_elem

    src, m, rows = _resampled(n_cells, seed)
    nnz_per = np.diff(m.indptr)[rows]
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(nnz_per, out=indptr[1:])
    kw = {"compression": "gzip", "compression_opts": 4, "chunks": (1 << 18,)} if gzip else {}
    with h5py.File(path, "w") as f:
        write_elem(f, "var", src.var[[]])
        obs = pd.DataFrame({"n_counts": np.asarray(src.obs["n_counts"])[rows]}, index=[f"c{i}" for i in range(n_cells)])
        write_elem(f, "obs", obs)
        X = f.create_group("X")
        X.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [n_cells, m.shape[1]]})
        data = X.create_dataset("data", shape=(int(indptr[-1]),), dtype=np.float32, **kw)
        indices = X.create_dataset("indices", shape=(int(indptr[-1]),), dtype=np.int32, **kw)
        X.create_dataset("indptr", data=indptr)
        for s in range(0, n_cells, block):
            b = m[rows[s:s + block]]
            data[indptr[s]:indptr[min(s + block, n_cells)]] = b.data
            indices[indptr[s]:indptr[min(s + block, n_cells)]] = b.indices
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})


def make_loom(path: Path, n_cells: int, *, seed: int = 0, block: int = 512) -> None:
    """The same cells as a loom file: dense genes x cells ``/matrix`` (64 x 64 gzip chunks, as loompy)."""
    import h5py

    src, m, rows = _resampled(n_cells, seed)
    with h5py.File(path, "w") as f:
        mat = f.create_dataset("matrix", shape=(m.shape[1], n_cells), dtype=np.float32, chunks=(64, 64),
                               compression="gzip", compression_opts=2)
        for s in range(0, n_cells, block):
            mat[:, s:s + block] = np.asarray(m[rows[s:s + block]].todense()).T
        f.create_group("layers")
        ra, ca = f.create_group("row_attrs"), f.create_group("col_attrs")
        ra.create_dataset("ensembl_id", data=np.asarray(src.var_names, dtype="S"))
        ca.create_dataset("CellID", data=np.asarray([f"c{i}" for i in range(n_cells)], dtype="S"))
        ca.create_dataset("n_counts", data=np.asarray(src.obs["n_counts"], dtype=np.float64)[rows])
        f.attrs["LOOM_SPEC_VERSION"] = "3.0.0"


def make_store(fmt: str, path: Path, n_cells: int, *, seed: int = 0) -> None:
    """Write the store, then flush it to disk: otherwise the kernel's write-back of the new (GB-sized) file
    runs during the measurement that follows and is charged to it."""
    if fmt.startswith("zarr"):
        make_zarr(path, n_cells, seed=seed, zarr_format=int(fmt[4]), sharded=fmt.endswith("sharded"))
    elif fmt == "loom":
        make_loom(path, n_cells, seed=seed)
    else:
        make_h5ad(path, n_cells, seed=seed, gzip=fmt == "h5ad-gzip")
    os.sync()


def _stages(path: str, chunk_size: int) -> dict:
    """CPU seconds of each stage run alone over the whole store (one thread for the core)."""
    import resource
    import shutil

    from scfm_fast.readers import open_reader
    from scfm_fast.store.writer import ShardedTokenWriter
    from scfm_fast.tokenizer.pipeline import TokenizerSpec, tokenize_chunk

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    spec = TokenizerSpec.build(n_threads=1)
    t = {"read": 0.0, "rank": 0.0, "write": 0.0}
    n = 0
    with open_reader(path) as r, tempfile.TemporaryDirectory() as d:
        col, _ = spec.resolve(r.var_names, source=path)
        w = ShardedTokenWriter(Path(d) / "o", config={})
        it = r.iter_chunks(start=0, chunk_size=chunk_size, obs_columns=["n_counts"])
        while True:
            c = cpu()
            ch = next(it, None)
            t["read"] += cpu() - c
            if ch is None:
                break
            c = cpu()
            tab, stats = tokenize_chunk(spec, ch, col, path=path, var_names=r.var_names)
            t["rank"] += cpu() - c
            c = cpu()
            w.write_shard(tab, file_index=0, start=ch.start, stop=ch.stop, stats=stats)
            t["write"] += cpu() - c
            n += ch.n_cells
        shutil.rmtree(Path(d) / "o")
    return {"cells": n, **{k: v * 20_000 / n for k, v in t.items()}}


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
    elif args.child == "stages":
        out = _stages(args.zarr, args.chunk_size)
    else:
        from scfm_fast.tokenizer import _run
        from scfm_fast.tokenizer.pipeline import tokenize_corpus

        if not args.threads:  # "in-process": one process, the core on all cores (not the default any more)
            _run.MAX_DEFAULT_WORKERS = 1

        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            c0 = resource.getrusage(resource.RUSAGE_SELF)
            man = tokenize_corpus(args.zarr, Path(d) / "out", backend=args.backend, n_threads=args.threads or None,
                                  chunk_size=args.chunk_size, progress_bar=False)
            dt = time.perf_counter() - t0
            c1 = resource.getrusage(resource.RUSAGE_SELF)
            ch = resource.getrusage(resource.RUSAGE_CHILDREN)  # the worker processes, once joined
        out = {"cells": man["summary"]["n_cells_in"], "seconds": dt,
               "cpu_s": c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime + ch.ru_utime + ch.ru_stime,
               "worker_peak_rss_mb": ch.ru_maxrss / 1024}
    out["peak_rss_mb"] = _harness.peak_rss_mb()
    print(json.dumps(out))


def run_child(*, env_extra: dict[str, str] | None = None, **kw) -> dict:
    cmd = [sys.executable, __file__]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, **(env_extra or {})}
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
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--scale-formats", nargs="+", default=[f for f in FORMATS if f != "loom"], choices=FORMATS,
                    help="formats also measured at --scale x the cells (loom's dense matrix is too large)")
    ap.add_argument("--no-ref-pipeline", dest="ref_pipeline", action="store_false",
                    help="skip the (slow) NumPy reference pipeline")
    # child-process arguments
    ap.add_argument("--child", choices=["core", "pipeline", "stages"], help=argparse.SUPPRESS)
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
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as d:
        stores = {}
        for fmt in args.formats:
            stores[fmt] = Path(d) / f"small_{fmt}{_SUFFIX[fmt]}"
            make_store(fmt, stores[fmt], args.cells)
        # the reference pipeline is ~100x slower: it runs on --ref-cells of the same cells (a rate)
        ref_store = Path(d) / "ref_zarr2.zarr"
        if args.ref_pipeline:
            make_store("zarr2", ref_store, args.ref_cells)
        p_ref = run_child(child="pipeline", backend="reference", zarr=ref_store, threads=1,
                          chunk_size=args.chunk_size) if args.ref_pipeline else None
        pref_rate = p_ref["cells"] / p_ref["seconds"] if p_ref else float("nan")
        if p_ref:
            rows.append({"stage": "end to end zarr2", "backend": "reference (numpy)", "threads": 1,
                         "cells": p_ref["cells"], "cells_per_s": pref_rate, "x_reference": 1.0,
                         "peak_rss_mb": p_ref["peak_rss_mb"]})
        t = max(args.threads)

        def e2e(stage: str, path: Path, threads: int, env_extra: dict[str, str] | None = None) -> dict:
            """``threads`` is ``--workers``: worker processes when > 1 and the input is large enough;
            0: one process, the core on all cores (the default is one worker per core)."""
            r = run_child(child="pipeline", backend="cpp", zarr=path, threads=threads, chunk_size=args.chunk_size,
                          env_extra=env_extra)
            rate = r["cells"] / r["seconds"]
            return {"stage": stage, "backend": "cpp", "threads": threads, "cells": r["cells"], "cells_per_s": rate,
                    "x_reference": rate / pref_rate, "peak_rss_mb": r["peak_rss_mb"],
                    # one process has no workers (its only child: h5py's import runs `uname -p`)
                    "worker_peak_rss_mb": (r["worker_peak_rss_mb"] or float("nan")) if threads > 1 else float("nan"),
                    "cpu_s_per_20k": r["cpu_s"] * 20_000 / r["cells"]}

        for fmt, path in stores.items():
            # one process; below MIN_WORKER_CELLS the default and --workers run the same loop
            small = e2e(f"end to end {fmt}", path, 0)
            rows.append(small)
            st = run_child(child="stages", zarr=path, chunk_size=args.chunk_size)
            rows.append({"stage": f"stages {fmt} (CPU s / 20k cells)", "backend": "cpp", "threads": 1,
                         "cells": st["cells"], "cells_per_s": float("nan"), "x_reference": float("nan"),
                         "peak_rss_mb": st["peak_rss_mb"],
                         **{f"{k}_cpu_s_per_20k": st[k] for k in ("read", "rank", "write")}})
            path_big = Path(d) / f"big_{fmt}{_SUFFIX[fmt]}"
            if args.scale > 1 and fmt in args.scale_formats:
                make_store(fmt, path_big, args.cells * args.scale, seed=1)
                for tt in (0, t):  # one process against --workers t (the default on t cores)
                    rows.append(e2e(f"end to end {fmt} ({args.scale}x cells)", path_big, tt))
                    if tt == 0:  # memory bounded by the chunk size: the same loop on --scale x the cells
                        rows[-1]["rss_vs_small"] = rows[-1]["peak_rss_mb"] / small["peak_rss_mb"]
                # shard files through the page cache instead of O_DIRECT (store/_direct.py), same run
                rows.append(e2e(f"end to end {fmt} ({args.scale}x cells, page cache)", path_big, t,
                                env_extra={"SCFM_FAST_DIRECT_IO": "0"}))
                shutil.rmtree(path_big) if path_big.is_dir() else path_big.unlink()
    for r in rows:
        extra = "  ".join(f"{k.replace('_cpu_s_per_20k', '')} {v:.2f}" for k, v in r.items()
                          if k.endswith("cpu_s_per_20k"))
        mode = "in-process" if r["threads"] == 0 else f"threads={r['threads']}"
        print(f"{r['stage']:<40} {r['backend']:<18} {mode:<10}  {r['cells']:>8,} cells  "
              f"{r['cells_per_s']:>10,.0f} cells/s  x{r['x_reference']:>6.1f} vs reference  "
              f"peak RSS {r['peak_rss_mb']:,.0f} MiB (worker {r.get('worker_peak_rss_mb', float('nan')):,.0f})  {('CPU s/20k: ' + extra) if extra else ''}")
    if not args.no_write:
        js, md = write_results("tokenize", rows, meta={"cells": args.cells, "scale": args.scale,
                                                       "chunk_size": args.chunk_size})
        print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
