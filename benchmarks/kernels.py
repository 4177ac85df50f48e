"""Per-op forward time of the Triton kernels vs their PyTorch ``*_ref`` references.

Shapes follow Geneformer V1 (hidden 256, 4 heads, FFN 512) on a packed batch of cells. On CUDA the Triton
launchers run; on the CPU (no GPU) only the dispatching wrappers run, which use plain torch ops there, so
the CPU table measures the torch path against the float32 references (a sanity check, not a kernel number).

    python benchmarks/kernels.py                  # CUDA when present, else CPU
    python benchmarks/kernels.py --tokens 65536 --dtype bf16
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py shadows the standard library's ``tokenize``: drop this folder from sys.path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
# run from a checkout without installing: the repository root goes first
sys.path.insert(0, os.path.dirname(_HERE))

import argparse
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_harness", HERE / "_harness.py")
_harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_harness)


def _cases(tokens: int, dtype: torch.dtype, device: str,
           seed: int = 0) -> tuple[list[int], list[tuple[str, Callable, Callable]]]:
    from scfm_fast.kernels import attention, bias_act, embeddings, layer_norm, pooling

    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    # realistic cell lengths (PBMC-like: ~1,000-2,048 genes), packed up to the token budget
    lens: list[int] = []
    while sum(lens) < tokens:
        lens.append(int(rng.integers(1000, 2049)))
    lens[-1] -= sum(lens) - tokens
    lens = [n for n in lens if n > 0]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device=device)
    max_len = max(lens)
    h, nh, ffn, vocab = 256, 4, 512, 25426

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    x, res = r(tokens, h), r(tokens, h)
    w, b = r(h).float(), r(h).float()
    inter, ib = r(tokens, ffn), r(ffn)
    ids = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    pos_ids = torch.cat([torch.arange(n) for n in lens]).to(device)
    word, pos, t0 = r(vocab, h), r(2048, h), r(h)
    q, k, v = (r(tokens, nh, h // nh) for _ in range(3))
    keep = torch.ones(tokens, dtype=torch.bool, device=device)
    return lens, [
        ("add_layer_norm", lambda: layer_norm.add_layer_norm(x, res, w, b, 1e-12),
         lambda: layer_norm.layer_norm_ref(x, res, w, b, 1e-12)),
        ("bias_act relu", lambda: bias_act.bias_act(inter, ib, "relu"),
         lambda: bias_act.bias_act_ref(inter, ib, "relu")),
        ("bias_act gelu", lambda: bias_act.bias_act(inter, ib, "gelu"),
         lambda: bias_act.bias_act_ref(inter, ib, "gelu")),
        ("embeddings", lambda: embeddings.bert_embeddings(ids, pos_ids, word, pos, t0, w, b, 1e-12),
         lambda: embeddings.embeddings_ref(ids, pos_ids, word, pos, t0, w, b, 1e-12)),
        ("segment_mean", lambda: pooling.segment_mean(x, cu, keep), lambda: pooling.segment_mean_ref(x, cu, keep)),
        ("varlen_attention", lambda: attention.varlen_attention(q, k, v, cu, max_len),
         lambda: attention.varlen_attention_ref(q, k, v, cu, max_len)),
    ] + ([  # on CUDA "auto" picks flash-attn or SDPA: time our Triton kernel by name too
        ("varlen_attention triton", lambda: attention.varlen_attention(q, k, v, cu, max_len, backend="triton"),
         lambda: attention.varlen_attention_ref(q, k, v, cu, max_len)),
    ] if device == "cuda" else [])


def main(argv: list[str] | None = None) -> int:
    """Time every op and write ``benchmarks/results/kernels_*.{json,md}``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=None, help="packed tokens per batch (default 65536 CUDA, 8192 CPU)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    tokens = a.tokens or (65536 if cuda else 8192)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype or ("bf16" if cuda else "fp32")]
    rows: list[dict[str, Any]] = []
    lens, cases = _cases(tokens, dtype, device)
    attn_flops = 4 * sum(n * n for n in lens) * 256  # QK^T and PV: 2 products x 2 flops x L^2 x (heads*dim)
    with torch.no_grad():
        for name, fast, ref in cases:
            # warm both first: the first calls pay for allocation and thread-pool start-up (and JIT on CUDA)
            for fn in (fast, ref, fast, ref):
                fn()
            tf = _harness.time_fn(fast, repeat=a.repeat, warmup=2, cuda=cuda)["median_s"]
            tr = _harness.time_fn(ref, repeat=a.repeat, warmup=2, cuda=cuda)["median_s"]
            row = {"op": name, "tokens": tokens, "dtype": str(dtype).removeprefix("torch."),
                   "fast_ms": round(tf * 1e3, 3), "ref_ms": round(tr * 1e3, 3), "x_ref": round(tr / tf, 2)}
            if name.startswith("varlen_attention"):
                row["fast_tflops"] = round(attn_flops / tf / 1e12, 2)
            rows.append(row)
    js, md = _harness.write_results("kernels", rows, meta={"path": "triton" if cuda else "torch (CPU dispatch)"})
    print(md.read_text() + f"\nwrote {js}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
