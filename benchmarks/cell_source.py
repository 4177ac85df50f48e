"""Memory of reading a token corpus through the cell source, part by part, vs reading it whole.

Builds a synthetic token dataset directory (``--cells`` cells of ~``--mean-len`` tokens, written with
the real ``ShardedTokenWriter``), then measures the peak of allocations tracked by ``tracemalloc``
(NumPy and Arrow buffers included) while

* ``parts``: every cell is taken through ``open_cells(DIR).parts(P)`` + ``take_packed`` (what embed does,
  and what a screen without ``--filter`` needs), for several part sizes ``P``;
* ``whole``: the token column is read whole with ``read_table(DIR, columns=["input_ids"])`` (what
  perturb's own reader does today).

The packed tokens are memory-mapped: their pages are file-backed and not counted as allocations.

    python benchmarks/cell_source.py [--cells 50000 --mean-len 1000]
"""

from __future__ import annotations

import os
import sys

# this folder's tokenize.py would shadow the standard library's: drop the folder before anything imports it
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

_spec = importlib.util.spec_from_file_location("_harness", os.path.join(_HERE, "_harness.py"))
_harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_harness)


def build(out: Path, n_cells: int, mean_len: int, *, shard: int = 5000, seed: int = 0) -> int:
    import pyarrow as pa

    from scfm_fast.store import ShardedTokenWriter

    rng = np.random.default_rng(seed)
    w = ShardedTokenWriter(out, config={"synthetic": n_cells, "special_tokens": {"<pad>": 0, "<mask>": 1}},
                           vocab_size=25_426)
    n_tokens = 0
    for start in range(0, n_cells, shard):
        n = min(shard, n_cells - start)
        lens = np.clip(rng.normal(mean_len, mean_len / 4, n).astype(np.int64), 1, 2048)
        flat = rng.integers(2, 25_426, int(lens.sum()), dtype=np.int32)
        offs = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(lens, out=offs[1:])
        table = pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offs), pa.array(flat)),
                          "length": pa.array(lens.astype(np.int32)),
                          "cell_index": pa.array(np.arange(start, start + n, dtype=np.int64)),
                          "file_index": pa.array(np.zeros(n, np.int32)),
                          "cell_id": pa.array([f"c{i}" for i in range(start, start + n)])})
        w.write_shard(table, file_index=0, start=start, stop=start + n, stats={"n_tokens": int(lens.sum())})
        n_tokens += int(lens.sum())
    w.finalize()
    return n_tokens


def _child(d: Path, reader: str, n_cells: int, n_tokens: int) -> None:
    """One measurement in a fresh process: the NumPy peak (tracemalloc) and Arrow's pool peak."""
    import json

    import pyarrow as pa

    from scfm_fast.store import read_table
    from scfm_fast.store.cells import open_cells

    tracemalloc.start()
    t0 = time.perf_counter()
    if reader == "whole":
        tab = read_table(d, columns=["input_ids"])
        assert tab.num_rows == n_cells
    else:
        total = 0
        for part in open_cells(d).parts(int(reader)):
            ids, _ = part.take_packed(np.arange(len(part)))
            total += int(ids.size)
        assert total == n_tokens
    dt = time.perf_counter() - t0
    numpy_peak = tracemalloc.get_traced_memory()[1]
    print(json.dumps({"numpy_peak_MiB": numpy_peak / 2**20, "arrow_peak_MiB": pa.default_memory_pool().max_memory()
                      / 2**20, "seconds": dt}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=50_000)
    ap.add_argument("--mean-len", type=int, default=1000)
    ap.add_argument("--parts", default="256,1024,4096")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        d, reader, n_cells, n_tokens = args.child
        _child(Path(d), reader, int(n_cells), int(n_tokens))
        return
    import json
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "tok"
        n_tokens = build(d, args.cells, args.mean_len)
        rows = []
        for reader in [*args.parts.split(","), "whole"]:
            out = subprocess.run([sys.executable, __file__, "--child", str(d), reader, str(args.cells), str(n_tokens)],
                                 check=True, capture_output=True, text=True).stdout
            m = json.loads(out.strip().splitlines()[-1])
            name = "read_table(input_ids) whole" if reader == "whole" else f"open_cells(DIR).parts({reader})"
            rows.append({"reader": name, "cells": args.cells, "tokens": n_tokens, **m,
                         "peak_MiB": m["numpy_peak_MiB"] + m["arrow_peak_MiB"]})
    for r in rows:
        print(r)
    _harness.write_results("cell_source", rows, meta={"note": "shared, loaded 2-core machine; allocation peaks "
                                                               "(tracemalloc + Arrow pool), each reader in a fresh process"})


if __name__ == "__main__":
    main()
