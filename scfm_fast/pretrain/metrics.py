"""Training metrics: model FLOPs (PRETRAINING.md formula), peak rate, ``metrics.jsonl`` and ``loss.png``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..model.config import EncoderConfig

# dense bf16 peak FLOP/s by device name fragment (PRETRAINING.md)
_GPU_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
_MEASURED: dict[tuple[str, torch.dtype], float] = {}


def train_flops(cfg: EncoderConfig, cell_lengths: np.ndarray, n_selected: int) -> float:
    """Training FLOPs (3 x forward) of a micro-batch: cells of ``cell_lengths``, head on ``n_selected`` rows.

    Forward per token: ``n * 2 * (4 d^2 + 2 d f)`` + attention ``n * 4 * L * d`` (L = the cell's length);
    the MLM head ``2 d^2 + 2 d V`` per selected row.
    """
    d, f, n, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    lens = np.asarray(cell_lengths, dtype=np.float64)
    tokens = lens.sum()
    fwd = tokens * n * 2 * (4 * d * d + 2 * d * f) + n * 4 * d * float((lens * lens).sum())
    fwd += n_selected * (2 * d * d + 2 * d * v)
    return 3.0 * fwd


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Peak FLOP/s: a table for known GPUs (bf16 dense), else measured with a short matmul in ``dtype``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for k, v in _GPU_PEAK.items():
            if k in name:
                return v
    key = (str(device), dtype)
    if key not in _MEASURED:
        # 1024: large enough that the CPU's matmul library reaches its rate (at 256 its set-up time on the
        # first calls dominated and the "peak" came out far too low, MFU above 1); untimed warm-up first
        n = 1024
        a = torch.randn(n, n, device=device, dtype=dtype)
        a @ a
        best = 0.0
        for _ in range(3):
            t0 = time.perf_counter()
            a @ a
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
        _MEASURED[key] = best
    return _MEASURED[key]


class MetricsLog:
    """Appends one JSON object per line to ``RUN_DIR/metrics.jsonl`` (flushed each write)."""

    def __init__(self, run_dir: Path, *, enabled: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled

    def write(self, rec: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written after the checkpoint a resume starts from)."""
        if not (self.enabled and self.path.exists()):
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        os.replace(tmp, self.path)


def plot_loss(run_dir: Path) -> None:
    """Write ``RUN_DIR/loss.png`` (training and eval loss against step) from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    recs = [json.loads(ln) for ln in path.read_text().splitlines() if ln]
    tr = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1)
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("masked-LM loss")
    ax.legend()
    fig.tight_layout()
    tmp = run_dir / ".loss.png.tmp"
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, run_dir / "loss.png")
