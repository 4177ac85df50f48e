"""End-to-end tokenize CPU of several source trees, alternated run by run on one store (a paired A/B).

On a shared VM, the same code's runs minutes apart differ by 10-30% (host load), more than most changes
save, so a change is measured here against the code before it in one session: each round runs every tree
once, in turn, on the same store.  A tree is a checkout whose C++ core is built in place (``python setup.py
build_ext --inplace``, or a copy of the matching ``scfm_fast/_core*.so``).  Each run is a fresh process
with ``PYTHONPATH=TREE`` (checked: the run fails if ``scfm_fast`` is imported from anywhere else), timed from
``tokenize_corpus`` to its return (imports excluded, as in ``benchmarks/tokenize.py``), into a fresh output
directory.  CPU counts the parent and its workers.  Set-up is the part of the wall time before the chunk
loop starts (the parent opening the inputs, loading the dictionaries, matching genes).

Run:  python benchmarks/tokenize_ab.py STORE --tree old=/path/to/checkout --tree new=. [--rounds 3]
      [--workers 2] [--no-write] [--tag NAME]
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py shadows the standard library's ``tokenize``: drop this script's folder from sys.path
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import importlib.util
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_harness", os.path.join(_HERE, "_harness.py"))
_harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_harness)

#: one run, in a child process: prints a JSON line (cells, wall s, CPU s, set-up s: until the chunk loop
#: starts, i.e. opening the inputs, dictionaries and gene matching in the parent)
_CHILD = """
import json, os, resource, sys, time
tree, store, out, workers = sys.argv[1:5]
import scfm_fast
from scfm_fast.tokenizer import pipeline
from scfm_fast.tokenizer.pipeline import tokenize_corpus
origin = os.path.realpath(scfm_fast.__file__)
if not origin.startswith(os.path.realpath(tree) + os.sep):
    sys.exit(f"scfm_fast was imported from {origin}, not from {tree}")
loop_start = []
for name in ("run_workers", "run_in_process"):
    def timed(*a, _f=getattr(pipeline, name), **k):
        loop_start.append(time.perf_counter())
        return _f(*a, **k)
    setattr(pipeline, name, timed)
os.sync()  # the previous run's writes are not charged to this one
t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
man = tokenize_corpus(store, out, n_threads=int(workers) or None, progress_bar=False)
wall = time.perf_counter() - t0
c1, ch = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime + ch.ru_utime + ch.ru_stime
print(json.dumps({"cells": man["summary"]["n_cells_in"], "wall_s": wall, "cpu_s": cpu,
                  "setup_s": (loop_start[0] if loop_start else t0) - t0}))
"""


def run_once(tree: Path, store: str, workers: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "SCFM_FAST_PROGRESS": "0"}
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(store))) as d:
        r = subprocess.run([sys.executable, "-c", _CHILD, str(tree), store, str(Path(d) / "out"), str(workers)],
                           capture_output=True, text=True, env=env, cwd=tree, check=False)
    if r.returncode != 0:
        sys.exit(f"run of {tree} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def tree_commit(tree: Path) -> str:
    """The tree's commit, with ``+dirty`` when its tracked files differ from it."""
    git = ["git", "-C", str(tree)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD"], check=False).returncode != 0
    return (head.stdout.strip() or "unknown") + ("+dirty" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", help="input file (h5ad / Zarr / loom), e.g. one made by benchmarks/tokenize.py")
    ap.add_argument("--tree", action="append", required=True, metavar="NAME=PATH",
                    help="a checkout with its core built in place; give two or more")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="--workers of each run (0: the default)")
    ap.add_argument("--no-write", action="store_true", help="print only; write nothing under results/")
    ap.add_argument("--tag", default="", help="added to the results' file name (several A/Bs on one day)")
    args = ap.parse_args()
    trees = {}
    for t in args.tree:
        name, sep, path = t.partition("=")
        if not sep or not Path(path).is_dir():
            ap.error(f"--tree {t!r}: expected NAME=PATH to a checkout")
        trees[name] = Path(path).resolve()
    if len(trees) < 2:
        ap.error("give at least two --tree NAME=PATH")

    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for k in range(args.rounds):
        for name, tree in trees.items():
            r = run_once(tree, os.path.abspath(args.store), args.workers)
            runs[name].append(r)
            print(f"round {k + 1} {name:>10}: {r['cells'] / r['wall_s']:>9,.0f} cells/s  "
                  f"{r['cpu_s'] * 20_000 / r['cells']:.3f} CPU s / 20k cells  set-up {r['setup_s']:.3f} s",
                  flush=True)
    rows = []
    for name, rs in runs.items():
        per20k = [r["cpu_s"] * 20_000 / r["cells"] for r in rs]
        rate = [r["cells"] / r["wall_s"] for r in rs]
        rows.append({"tree": name, "store": os.path.basename(args.store.rstrip("/")), "workers": args.workers,
                     "cells": rs[0]["cells"], "rounds": len(rs), "cells_per_s_median": statistics.median(rate),
                     "cpu_s_per_20k_min": min(per20k), "cpu_s_per_20k_median": statistics.median(per20k),
                     "cpu_s_per_20k_max": max(per20k), "setup_s_median": statistics.median(r["setup_s"] for r in rs)})
    base = rows[0]["cpu_s_per_20k_median"]
    for row in rows:
        row["cpu_vs_first"] = row["cpu_s_per_20k_median"] / base
        print(f"{row['tree']:>10}: CPU s / 20k cells min {row['cpu_s_per_20k_min']:.3f}  median "
              f"{row['cpu_s_per_20k_median']:.3f}  max {row['cpu_s_per_20k_max']:.3f}  ({row['cpu_vs_first']:.3f}x "
              f"{rows[0]['tree']});  median {row['cells_per_s_median']:,.0f} cells/s, set-up {row['setup_s_median']:.3f} s")
    if not args.no_write:
        stem = "".join(c if c.isalnum() else "-" for c in rows[0]["store"].lower())
        meta = {"trees": {n: {"path": str(p), "commit": tree_commit(p)} for n, p in trees.items()}}
        tag = f"_{args.tag}" if args.tag else ""
        paths = _harness.write_results(f"tokenize_ab_{stem}_w{args.workers}{tag}", rows, meta=meta)
        print("wrote", *paths)


if __name__ == "__main__":
    main()
