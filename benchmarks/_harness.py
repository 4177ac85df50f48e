"""Shared benchmark plumbing: timing, peak memory, JSON + markdown results.

Each benchmark script measures a fast path and its reference in the same run and reports the
ratio, so numbers from different machines are never compared directly.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu} ({os.cpu_count()} cores)"


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB): ``VmHWM`` of ``/proc/self/status`` on Linux.

    Not ``ru_maxrss``: Linux carries it across ``execve``, and ``subprocess`` starts a child with ``vfork``,
    so a benchmark's child process reported its launcher's peak when that was larger (a 14 MiB child of a
    600 MiB benchmark process read 614 MiB). ``ru_maxrss`` only where there is no ``/proc``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_fn(fn: Callable[[], Any], *, repeat: int = 3, warmup: int = 1, cuda: bool = False) -> dict[str, float]:
    """Median / min wall time of ``fn`` in seconds (CUDA-synchronised when ``cuda``)."""
    def sync() -> None:
        if cuda:
            import torch

            torch.cuda.synchronize()
    for _ in range(warmup):
        fn()
        sync()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "repeat": repeat}


def write_results(name: str, rows: list[dict[str, Any]], *, meta: dict[str, Any] | None = None,
                  out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write ``<name>_<device>_<date>.json`` and ``.md`` under ``benchmarks/results``.

    ``$SCFM_BENCH_RESULTS`` overrides the folder (the GPU runner points it at ``$OUT``).
    """
    out_dir = out_dir or Path(os.environ.get("SCFM_BENCH_RESULTS") or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = device_name()
    date = _dt.date.today().isoformat()
    slug = "".join(c if c.isalnum() else "-" for c in dev.lower()).strip("-")[:40]
    base = out_dir / f"{name}_{slug}_{date}"
    info = {"benchmark": name, "device": dev, "date": date, "commit": git_commit(),
            "python": platform.python_version(), **(meta or {})}
    try:
        import scfm_fast

        info["scfm_fast"] = getattr(scfm_fast, "__version__", "unknown")
    except ImportError:
        pass
    Path(f"{base}.json").write_text(json.dumps({"meta": info, "rows": rows}, indent=2, default=str))
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = [f"# {name}", "", f"device: {dev} · date: {date} · commit: {info['commit']}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    Path(f"{base}.md").write_text("\n".join(lines) + "\n")
    return Path(f"{base}.json"), Path(f"{base}.md")


def matmul_tflops(device: str = "cuda", dtype: str = "bfloat16", n: int | None = None, repeat: int = 10) -> float:
    """Measured matrix-product rate (TFLOP/s) on random ``n x n`` operands of ``dtype``: the device's
    practical ceiling, measured in the same run as the numbers compared with it (METHOD: datasheet rates
    are leads). Float32 products on CUDA run as true fp32 (PyTorch's default, no TF32), as our engines do."""
    import torch

    cuda = str(device).startswith("cuda")
    n = n or (8192 if cuda else 2048)
    a, b = (torch.randn(n, n, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
    t = time_fn(lambda: a @ b, repeat=repeat if cuda else 3, warmup=3 if cuda else 1, cuda=cuda)["median_s"]
    return 2 * n**3 / t / 1e12


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
