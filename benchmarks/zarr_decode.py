"""Zarr chunk decoding on a local store: zarr-python vs numcodecs directly (scfm's reader) vs tensorstore.

Reads ``X/data`` and ``X/indices`` of resampled PBMC cells (see ``tokenize.py``) in the reader's block
size, from a Zarr v2 (blosc lz4) and a Zarr v3 (zstd) store; reports CPU seconds (all threads) and
wall seconds, best of ``--repeat``. tensorstore is optional (``pip install tensorstore``); it is run
with its own thread pool and with one thread.

Run:  python benchmarks/zarr_decode.py [--cells 20000] [--repeat 5]
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

_spec = importlib.util.spec_from_file_location("_tok", os.path.join(_HERE, "tokenize.py"))
_tok = importlib.util.module_from_spec(_spec)
_argv, sys.argv = sys.argv, sys.argv[:1]
_spec.loader.exec_module(_tok)
sys.argv = _argv


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _methods(store: str, driver: str) -> dict:
    import zarr

    from scfm_fast.readers._zarr_direct import read_direct

    arrs = {k: zarr.open_group(f"{store}/X", mode="r")[k] for k in ("data", "indices")}
    out = {"zarr-python": lambda k, lo, hi: np.asarray(arrs[k][lo:hi]),
           "numcodecs direct (scfm)": lambda k, lo, hi: read_direct(arrs[k], slice(lo, hi))}
    try:
        import tensorstore as ts
    except ImportError:
        return out
    one = ts.Context({"data_copy_concurrency": {"limit": 1}, "file_io_concurrency": {"limit": 1}})
    for name, ctx in (("tensorstore (own pool)", None), ("tensorstore (1 thread)", one)):
        spec = {k: {"driver": driver, "kvstore": {"driver": "file", "path": f"{store}/X/{k}"}} for k in arrs}
        h = {k: ts.open(s, read=True, **({"context": ctx} if ctx else {})).result() for k, s in spec.items()}
        out[name] = lambda k, lo, hi, h=h: h[k][lo:hi].read().result()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--block", type=int, default=1 << 24, help="elements per read (the reader's budget)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        for fmt, driver in ((2, "zarr"), (3, "zarr3")):
            store = str(Path(d) / f"v{fmt}.zarr")
            _tok.make_zarr(Path(store), args.cells, zarr_format=fmt)
            meths = _methods(store, driver)
            first = meths["zarr-python"]
            import zarr

            n = zarr.open_group(f"{store}/X", mode="r")["data"].shape[0]
            want = {k: first(k, 0, n) for k in ("data", "indices")}
            for name, f in meths.items():
                for k in want:  # every method must return the same values
                    assert np.array_equal(f(k, 0, n), want[k]), (name, k)
                best = (float("inf"), float("inf"))
                for _ in range(args.repeat):
                    c, t = _cpu(), time.perf_counter()
                    for lo in range(0, n, args.block):
                        for k in want:
                            f(k, lo, min(n, lo + args.block))
                    best = min(best, (_cpu() - c, time.perf_counter() - t))
                print(f"zarr v{fmt}  {name:<26} CPU {best[0]:.2f} s  wall {best[1]:.2f} s  "
                      f"({args.cells:,} cells, data + indices)", flush=True)


if __name__ == "__main__":
    main()
