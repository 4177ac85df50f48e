"""Pretraining throughput: our packed trainer step vs Hugging Face ``BertForMaskedLM`` on padded batches.

Cells: real human PBMC cells (the bundled 10x v3 file) tokenized with the Geneformer V1 preset (V1
vocabulary, 25,426 tokens; cells cut to 2,048 positions as the preset does), or ``--tokens DIR``;
``--steps x --batch-cells`` of them drawn with replacement (seeded), so lengths vary as in real data.
Each draw is its own sample (its own mask).

Both trainers get the same cells, the same masks (our Masker feeds both), the same initial weights
(the V1-6L shape), the same AdamW (fused; no decay on biases / LayerNorm), grad clipping at 1.0 and
the same autocast dtype:

* **HF baseline** as Geneformer's pretrainer batches: ``--batch-cells`` (12) cells per step, the cells
  of one megabatch (Geneformer: 50 batches, here all drawn cells) sorted by length, longest first, cut
  into consecutive batches and padded to each batch's longest cell; SDPA attention; the MLM decoder and
  cross-entropy over every position.
* **ours** (``mlm_loss_sum`` + the trainer's step): the same cells packed without padding under a token
  budget equal to the mean non-pad tokens of an HF batch (total tokens / number of HF batches, i.e.
  what ``scfm pretrain --batch-tokens`` would be set to), megabatch length-sorted as ``plan_epoch`` does;
  the MLM head on the selected rows only, chunked linear + cross-entropy.

Each trainer runs in its own worker process (so peak RSS is its own) and the driver alternates them
step by step (ours, HF, ours, HF ...) to cancel load drift on a shared machine; one untimed warm-up step
each. Batch assembly is not timed for either (both trainers prefetch in the background). Reports non-pad
tokens/s, peak RSS, MFU (PRETRAINING.md formula, the same model FLOPs for both: head on selected rows)
against a matmul timed at start-up, the FLOPs each side actually executes, and the speedup.

    python benchmarks/pretrain.py --steps 4            # PBMC cells, V1 preset, V1-6L, bf16 autocast
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

_spec = importlib.util.spec_from_file_location("_harness", os.path.join(_HERE, "_harness.py"))
_harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_harness)

DEMO = Path(_HERE).parent / "scfm_fast" / "data" / "demo" / "pbmc_200cells.h5ad"


def tokenize_pbmc(out: Path) -> Path:
    """The bundled PBMC cells through ``scfm tokenize --preset geneformer-v1`` (V1 dictionaries, 2,048)."""
    subprocess.run([sys.executable, "-m", "scfm_fast", "tokenize", str(DEMO), "--out", str(out),
                    "--preset", "geneformer-v1"], check=True, capture_output=True)
    return out


def plan(lengths: np.ndarray, *, steps: int, batch_cells: int) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """(HF batches, our batches, our token budget), as positions into ``lengths`` (the drawn cells)."""
    from scfm_fast.loader import megabatch_batches

    order = np.argsort(-lengths, kind="stable")  # one megabatch, longest first (HF's length grouping)
    hf = [order[i:i + batch_cells] for i in range(0, order.size, batch_cells)]
    budget = int(np.ceil(lengths.sum() / len(hf)))  # mean non-pad tokens of an HF batch
    ours = megabatch_batches(lengths, max_tokens=budget, megabatch=lengths.size)
    return hf, ours, budget


def executed_flops(cfg, lengths: np.ndarray, n_selected: int, *, padded: bool) -> dict[str, float]:
    """Training FLOPs (3 x forward) a trainer executes on one batch, by part: matrix products of the
    layers, attention, MLM head (HF: every padded position; ours: the selected rows)."""
    d, f, n, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    lens = np.full(lengths.size, lengths.max(), np.float64) if padded else lengths.astype(np.float64)
    rows = lens.sum()
    head_rows = rows if padded else n_selected
    return {"layers": 3.0 * rows * n * 2 * (4 * d * d + 2 * d * f),
            "attention": 3.0 * n * 4 * d * float((lens * lens).sum()),
            "head": 3.0 * head_rows * (2 * d * d + 2 * d * v)}


def _worker(kind: str, conn, setup: dict) -> None:
    """Build one trainer and its batches, then run steps on request: ``("step", i)`` -> seconds."""
    import torch

    from scfm_fast.pretrain.build import build_model, dataset_vocab, make_optimizer, model_config
    from scfm_fast.pretrain.data import Corpus, make_batch
    from scfm_fast.pretrain.distributed import clip_grad_norm
    from scfm_fast.pretrain.masking import Masker, protected_ids
    from scfm_fast.pretrain.objectives import mlm_loss_sum
    from scfm_fast.pretrain.presets import PretrainOptions

    amp = setup["dtype"] == "bfloat16"
    opts = PretrainOptions(out="-", preset=setup["shape"], dropout=setup["dropout"]).resolved()
    vocab, specials, _ = dataset_vocab([setup["tokens"]], token_dictionary=setup["token_dictionary"])
    cfg = model_config(opts, vocab_size=vocab, specials=specials)
    corpus = Corpus([setup["tokens"]], max_len=cfg.max_position_embeddings, truncate=True)
    masker = Masker(vocab_size=vocab, mask_id=specials["<mask>"], protected=protected_ids(specials,
                                                                                          protect_special=False))
    samples = np.asarray(setup["samples"], dtype=np.int64)
    torch.manual_seed(0)
    model, head = build_model(cfg, init=None)
    batches = [make_batch(corpus, masker, samples[b], epoch=0) for b in setup["batches"][kind]]
    if kind == "ours":
        model.train()
        head.train()
        opt = make_optimizer(model, head, opts, torch.device("cpu"))
        params = list({id(p): p for p in list(model.parameters()) + list(head.parameters())}.values())

        def step(b) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                ls, _ = mlm_loss_sum(model, head, b)
            (ls / max(1, b.labels.numel())).backward()
            clip_grad_norm(params, opts.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        import transformers

        init = {**{f"bert.{k}": v for k, v in model.state_dict().items()},
                **{f"cls.predictions.{k}": v for k, v in head.state_dict().items() if k != "decoder.weight"}}
        hf = transformers.BertForMaskedLM(transformers.BertConfig(**cfg.to_hf_dict(), attn_implementation="sdpa"))
        missing, unexpected = hf.load_state_dict(init, strict=False)
        left = [k for k in missing if not k.startswith("cls.predictions.decoder.")]  # tied to the embeddings
        if left or unexpected:
            raise RuntimeError(f"HF baseline: weights not loaded: missing {left}, unexpected {unexpected}")
        del model, head
        hf.train()
        # the same AdamW as make_optimizer: no weight decay on biases and LayerNorm weights
        named = list(hf.named_parameters())
        nd = [p for n, p in named if n.endswith("bias") or "LayerNorm" in n]
        dec = [p for n, p in named if not (n.endswith("bias") or "LayerNorm" in n)]
        opt = torch.optim.AdamW([{"params": dec, "weight_decay": opts.weight_decay},
                                 {"params": nd, "weight_decay": 0.0}], lr=opts.lr, fused=True)
        params = [p for _, p in named]
        pad = specials["<pad>"]
        padded = [_pad(b, pad) for b in batches]
        batches = padded

        def step(b) -> None:
            ids, att, lab = b
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = hf(input_ids=ids, attention_mask=att, labels=lab).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)

    rss0 = _harness.peak_rss_mb()
    conn.send(("ready", len(batches), rss0))
    while True:
        cmd, i = conn.recv()
        if cmd == "stop":
            conn.send(("peak_rss_mb", _harness.peak_rss_mb()))
            return
        t0 = time.perf_counter()
        step(batches[i])
        conn.send(("seconds", time.perf_counter() - t0))


def _pad(b, pad_id: int):
    """A packed masked batch as HF input: ids padded to the longest cell, attention mask, labels -100."""
    import torch

    cu = b.packed.cu_seqlens.tolist()
    n_cells = len(cu) - 1
    L = max(cu[i + 1] - cu[i] for i in range(n_cells))
    ids = torch.full((n_cells, L), pad_id, dtype=torch.long)
    att = torch.zeros(n_cells, L, dtype=torch.long)
    lab = torch.full((n_cells, L), -100, dtype=torch.long)
    flat = torch.full((cu[-1],), -100, dtype=torch.long)
    flat[b.label_pos] = b.labels
    for i in range(n_cells):
        n = cu[i + 1] - cu[i]
        ids[i, :n], att[i, :n], lab[i, :n] = b.packed.input_ids[cu[i]:cu[i + 1]], 1, flat[cu[i]:cu[i + 1]]
    return ids, att, lab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", help="token dataset (default: the bundled PBMC cells, tokenized with the V1 preset)")
    ap.add_argument("--token-dictionary")
    ap.add_argument("--shape", default="geneformer-v1-6l")
    ap.add_argument("--steps", type=int, default=4, help="timed HF steps (cells drawn: steps x batch-cells)")
    ap.add_argument("--batch-cells", type=int, default=12)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="both models (the V1 recipe has 0.02; any attention dropout takes SDPA off its fused "
                         "CPU kernel, for both)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-name", default="pretrain")
    args = ap.parse_args()
    import torch

    from scfm_fast.pretrain.build import dataset_vocab, model_config
    from scfm_fast.pretrain.data import Corpus
    from scfm_fast.pretrain.masking import Masker, protected_ids
    from scfm_fast.pretrain.metrics import peak_flops, train_flops
    from scfm_fast.pretrain.presets import PretrainOptions

    tmp = tempfile.TemporaryDirectory(prefix="scfm_bench_pretrain_")
    tokens = args.tokens or str(tokenize_pbmc(Path(tmp.name) / "pbmc_v1"))
    opts = PretrainOptions(out="-", preset=args.shape, dropout=args.dropout).resolved()
    vocab, specials, _ = dataset_vocab([tokens], token_dictionary=args.token_dictionary)
    cfg = model_config(opts, vocab_size=vocab, specials=specials)
    corpus = Corpus([tokens], max_len=cfg.max_position_embeddings, truncate=True)
    n = args.steps * args.batch_cells
    cells = np.random.default_rng(args.seed).integers(0, len(corpus), n)
    samples = cells + len(corpus) * np.arange(n)  # each draw its own sample id, so its own mask
    lens = corpus.lengths[cells].astype(np.int64)
    hf_b, our_b, budget = plan(lens, steps=args.steps, batch_cells=args.batch_cells)

    # model FLOPs (same for both) and what each side executes, from the same masks
    masker = Masker(vocab_size=vocab, mask_id=specials["<mask>"], protected=protected_ids(specials,
                                                                                          protect_special=False))
    n_sel = np.array([masker(corpus.tokens(int(c)), epoch=0, sample=int(s))[1].size for c, s in zip(cells, samples)])
    model_flops = sum(train_flops(cfg, lens[b], int(n_sel[b].sum())) for b in our_b)
    ex = {"ours": [executed_flops(cfg, lens[b], int(n_sel[b].sum()), padded=False) for b in our_b],
          "hf": [executed_flops(cfg, lens[b], int(n_sel[b].sum()), padded=True) for b in hf_b]}
    ex = {k: {p: sum(e[p] for e in v) for p in ("layers", "attention", "head")} for k, v in ex.items()}
    peak = peak_flops(torch.device("cpu"), torch.bfloat16 if args.dtype == "bfloat16" else torch.float32)

    setup = {"tokens": tokens, "token_dictionary": args.token_dictionary, "shape": args.shape, "dtype": args.dtype,
             "dropout": args.dropout, "samples": samples.tolist(),
             "batches": {"ours": [b.tolist() for b in our_b], "hf": [b.tolist() for b in hf_b]}}
    ctx = mp.get_context("spawn")
    workers = {}
    for kind in ("ours", "hf"):
        a, b = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(kind, b, setup), daemon=True)
        p.start()
        workers[kind] = (p, a)
    ready = {k: w[1].recv() for k, w in workers.items()}
    for k, r in ready.items():
        if r[0] != "ready":
            raise RuntimeError(f"{k} worker: {r}")
    load0 = os.getloadavg()
    for _, c in workers.values():  # untimed warm-up: each trainer's first batch
        c.send(("step", 0))
        c.recv()
    secs = {"ours": [], "hf": []}
    n_steps = {k: len(v) for k, v in (("ours", our_b), ("hf", hf_b))}
    for i in range(max(n_steps.values())):  # interleaved: ours, HF, ours, HF ...
        for kind, (_, c) in workers.items():
            if i < n_steps[kind]:
                c.send(("step", i))
                secs[kind].append(c.recv()[1])
                print(f"{kind} step {i}: {secs[kind][-1]:.2f} s", file=sys.stderr, flush=True)
    peak_rss = {}
    for kind, (p, c) in workers.items():
        c.send(("stop", 0))
        peak_rss[kind] = c.recv()[1]
        p.join(timeout=60)
    load1 = os.getloadavg()

    toks = int(lens.sum())
    rows = []
    for kind, label in (("ours", "scfm packed (head on selected rows)"), ("hf", "HF BertForMaskedLM, padded")):
        sec = float(sum(secs[kind]))
        rows.append({"trainer": label, "steps": n_steps[kind], "cells": n, "non_pad_tokens": toks,
                     "padded_tokens": int(sum(lens[b].max() * b.size for b in hf_b)) if kind == "hf" else toks,
                     "seconds": sec, "tokens_per_s": toks / sec, "mfu": model_flops / sec / peak,
                     "executed_tflop": sum(ex[kind].values()) / 1e12,
                     "executed_tflop_per_s": sum(ex[kind].values()) / sec / 1e12,
                     "peak_rss_mb": peak_rss[kind], "rss_before_steps_mb": ready[kind][2],
                     "step_seconds": [round(s, 3) for s in secs[kind]]})
    speedup = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    tot = {k: sum(v.values()) for k, v in ex.items()}
    meta = {"machine": "shared/loaded machine (other engineers' jobs running; ratios within this run only)",
            "shape": args.shape, "vocab": vocab, "dtype": args.dtype, "dropout": args.dropout,
            "data": "bundled PBMC (10x v3) cells, V1 preset" if not args.tokens else tokens,
            "cell_lengths": {"mean": float(lens.mean()), "min": int(lens.min()), "median": float(np.median(lens)),
                             "max": int(lens.max()), "at_2048": int((lens >= 2048).sum())},
            "hf_batch_cells": args.batch_cells, "our_batch_tokens": budget, "selected_tokens": int(n_sel.sum()),
            "speedup": speedup, "executed_flops_ratio_hf_over_ours": tot["hf"] / tot["ours"],
            "executed_flops_share": {k: {p: v[p] / tot[k] for p in v} for k, v in ex.items()},
            "peak_flops_measured": peak, "loadavg_start": load0, "loadavg_end": load1,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "command": "python benchmarks/pretrain.py " + " ".join(sys.argv[1:])}
    js, md = _harness.write_results(args.out_name, rows, meta=meta)
    with open(md, "a") as f:
        f.write(f"\nspeedup (non-pad tokens/s, ours / HF): **{speedup:.2f}x**; FLOPs executed HF / ours: "
                f"{meta['executed_flops_ratio_hf_over_ours']:.2f}x\n\n")
        f.write(f"{meta['machine']}; load average {load0[0]:.1f} at start, {load1[0]:.1f} at end\n\n")
        f.write(f"setup: {args.shape}, vocab {vocab}, {args.dtype} autocast, dropout {args.dropout}, {n} cells "
                f"(lengths mean {lens.mean():.0f}, median {np.median(lens):.0f}, {meta['cell_lengths']['at_2048']} "
                f"cut at 2048), HF {args.batch_cells} cells/step, ours --batch-tokens {budget}\n\n")
        f.write("executed FLOPs share (layers / attention / head): " + "; ".join(
            f"{k} " + " / ".join(f"{v[p]:.0%}" for p in ("layers", "attention", "head"))
            for k, v in meta["executed_flops_share"].items()) + "\n\n")
        f.write(f"command: `{meta['command']}`\n")
    print(json.dumps({"speedup": speedup, "rows": rows, "json": str(js), "md": str(md)}, indent=1))


if __name__ == "__main__":
    main()
