"""Cost of recording one shard in a token run's manifest, against the number of shards already recorded.

Drives :meth:`ShardedTokenWriter.record` directly with synthetic shard records shaped like a real run's
(no shard files are written: only the manifest bookkeeping is measured). For each N the writer is brought
to N recorded shards, then ``--k`` more are recorded and timed; "bytes/shard" is what the process passed to
``write()`` per recorded shard (``wchar`` of ``/proc/self/io``), fsyncs included in the time.

Run:  python benchmarks/manifest.py [--n 100 1000 10000] [--k 20]
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py would shadow the standard library's ``tokenize`` (imported by pandas): drop this
# script's folder from sys.path before anything else is imported
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import tempfile
import time
from pathlib import Path

from scfm_fast.store import ShardedTokenWriter  # noqa: E402
from scfm_fast.store.schema import shard_name  # noqa: E402


def _wchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def _stats(i: int) -> dict:
    return {"n_tokens": 2_048_000 + i, "n_cells_in": 10_000, "n_empty": 3, "n_filtered": 120,
            "n_at_max_len": 4_000, "counts_total": 31_234_567.0, "counts_matched": 30_123_456.0,
            "n_qc_dropped": 0}


def _record(w: ShardedTokenWriter, i: int) -> None:
    fi, start = divmod(i, 100)  # 100 chunks of 10,000 cells per input file
    w.record(shard_name(fi, start * 10_000), file_index=fi, start=start * 10_000, stop=(start + 1) * 10_000,
             n_cells_written=9_877, stats=_stats(i))


def measure(n: int, k: int) -> tuple[float, float, float]:
    """(ms per recorded shard, bytes written per recorded shard, ms of one whole-manifest rewrite) with
    ``n`` shards already recorded."""
    with tempfile.TemporaryDirectory() as d:
        config = {"inputs": [f"/data/corpus/file_{j:05d}.h5ad" for j in range(n // 100 + 1)], "chunk_size": 10_000}
        w = ShardedTokenWriter(Path(d) / "o", config=config)
        w.update(inputs=config["inputs"], gene_match=[{"n_matched": 20_000}] * len(config["inputs"]))
        for i in range(n):  # n shards recorded as a resumed run finds them (filling by record() is O(n^2) before)
            fi, start = divmod(i, 100)
            rec = {"file": shard_name(fi, start * 10_000), "file_index": fi, "start": start * 10_000,
                   "stop": (start + 1) * 10_000, "n_cells_written": 9_877, **_stats(i)}
            w.manifest["shards"].append(rec)
            w._index[rec["file"]] = rec
        w._save()
        b0, t0 = _wchar(), time.perf_counter()
        for i in range(n, n + k):
            _record(w, i)
        ms, b = (time.perf_counter() - t0) / k * 1e3, (_wchar() - b0) / k
        t0 = time.perf_counter()
        w._save()  # a whole-manifest rewrite: at start, update() and finalize
        return ms, b, (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[100, 1_000, 10_000])
    ap.add_argument("--k", type=int, default=20)
    a = ap.parse_args()
    print("| shards recorded | ms / shard | bytes written / shard | ms / whole-manifest rewrite |\n|---:|---:|---:|---:|")
    for n in a.n:
        ms, b, full = measure(n, a.k)
        print(f"| {n:,} | {ms:.2f} | {b:,.0f} | {full:.1f} |", flush=True)


if __name__ == "__main__":
    main()
