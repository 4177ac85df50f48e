"""Peak memory of ``scfm perturb`` over a token corpus without ``--filter``: flat in the corpus size.

Builds synthetic token dataset directories of ``--cells`` sizes (short cells whose genes come from a small
id range, so the few screened genes occur often; written with the real ``ShardedTokenWriter``), saves a
tiny random BERT checkpoint, then runs ``scfm perturb DIR --genes G1,G2 --cells-per-shard N --no-stats``
in a fresh process per size and records its peak resident memory (``VmHWM``, torch's import
included) and wall time. Cells are read part by part through ``open_cells``, so the peak should not grow
with the number of cells; a corpus read whole would add its tokens (and Python objects per cell).

    python benchmarks/perturb_memory.py [--cells 5000 50000 --mean-len 32 --cells-per-shard 2000]
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

_spec = importlib.util.spec_from_file_location("_harness", os.path.join(_HERE, "_harness.py"))
_harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_harness)

VOCAB, GENE_RANGE, GENES = 1000, 300, (10, 11)


def build(out: Path, n_cells: int, mean_len: int, *, shard: int = 5000, seed: int = 0) -> None:
    import pyarrow as pa

    from scfm_fast.store import ShardedTokenWriter

    rng = np.random.default_rng(seed)
    w = ShardedTokenWriter(out, config={"synthetic": n_cells, "special_tokens": {"<pad>": 0, "<mask>": 1}},
                           vocab_size=VOCAB)
    for start in range(0, n_cells, shard):
        n = min(shard, n_cells - start)
        lens = np.clip(rng.normal(mean_len, mean_len / 4, n).astype(np.int64), 2, 60)
        # distinct genes per cell (a cell holds a gene once), drawn from a small range
        cells = [rng.choice(np.arange(2, GENE_RANGE), size=int(k), replace=False) for k in lens]
        offs = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(lens, out=offs[1:])
        table = pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offs), pa.array(np.concatenate(cells).astype(np.int32))),
                          "length": pa.array(lens.astype(np.int32)),
                          "cell_index": pa.array(np.arange(start, start + n, dtype=np.int64)),
                          "file_index": pa.array(np.zeros(n, np.int32))})
        w.write_shard(table, file_index=0, start=start, stop=start + n, stats={"n_tokens": int(lens.sum())})
    w.finalize()


def save_model(d: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from scfm_fast.model.bert import BertEncoderModel
    from scfm_fast.model.config import EncoderConfig

    torch.manual_seed(0)
    m = BertEncoderModel(EncoderConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=64, hidden_act="gelu"))
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(m.config.to_hf_dict()))
    save_file({f"bert.{k}": v.contiguous() for k, v in m.state_dict().items()}, str(d / "model.safetensors"))


#: one size, in a fresh interpreter; its peak from ``_harness.peak_rss_mb`` (``VmHWM``: ``ru_maxrss`` would carry
#: over this launching process's peak)
_CHILD = """
import importlib.util, json, sys, time
spec = importlib.util.spec_from_file_location("_harness", {harness!r})
harness = importlib.util.module_from_spec(spec)
spec.loader.exec_module(harness)
sys.argv = ["scfm"] + {argv!r}
from scfm_fast.cli import main
t0 = time.perf_counter()
rc = main(sys.argv[1:])
print(json.dumps({{"rc": rc, "seconds": time.perf_counter() - t0, "peak_rss_mib": harness.peak_rss_mb()}}))
"""


def measure(tokens: Path, ckpt: Path, out: Path, cps: int) -> dict:
    argv = ["perturb", str(tokens), "--model", str(ckpt), "--genes", ",".join(map(str, GENES)), "--cells-per-shard",
            str(cps), "--no-stats", "--out", str(out), "--devices", "cpu", "--batch-tokens", "4096"]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(_HERE), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", _CHILD.format(argv=argv, harness=_harness.__file__)], capture_output=True, text=True, env=env,
                         check=False)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, nargs="+", default=[5000, 50000])
    ap.add_argument("--mean-len", type=int, default=32)
    ap.add_argument("--cells-per-shard", type=int, default=2000)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        save_model(t / "ckpt")
        for n in args.cells:
            build(t / f"tokens_{n}", n, args.mean_len)
            r = measure(t / f"tokens_{n}", t / "ckpt", t / f"out_{n}", args.cells_per_shard)
            import pyarrow.parquet as pq

            r.update(cells=n, mean_len=args.mean_len, cells_per_shard=args.cells_per_shard, genes=len(GENES),
                     perturbations=pq.read_metadata(t / f"out_{n}" / "perturbations.parquet").num_rows)
            print(r, flush=True)
            rows.append(r)
    _harness.write_results("perturb_memory", rows, meta={
        "what": "scfm perturb without --filter: peak RSS of the whole process (torch included) vs corpus size",
        "note": "CPU, OMP_NUM_THREADS=1, on a shared 2-core machine loaded by other jobs: times are indicative only"})


if __name__ == "__main__":
    main()
