"""Pretraining throughput: our packed trainer step vs Hugging Face ``BertForMaskedLM`` on padded batches.

Same cells, same model shape and initial weights, same masks (our Masker feeds both), same AdamW. The
baseline is what Geneformer's pretrainer does: ``--batch-cells`` cells per batch, length-grouped inside
megabatches, padded to the batch's longest cell, SDPA attention, the MLM decoder over every position.
Reports non-pad tokens/s, peak memory and MFU (PRETRAINING.md formula; head FLOPs on the selected rows).

    python benchmarks/pretrain.py --tokens TOKENS_DIR --token-dictionary PKL --shape v1-6l --steps 10
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--token-dictionary")
    ap.add_argument("--shape", default="geneformer-v1-6l")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-cells", type=int, default=12)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    import transformers

    from scfm_fast.loader import megabatch_batches
    from scfm_fast.pretrain.build import build_model, dataset_vocab, make_optimizer, model_config
    from scfm_fast.pretrain.data import Corpus, make_batch
    from scfm_fast.pretrain.masking import Masker, protected_ids
    from scfm_fast.pretrain.metrics import peak_flops, train_flops
    from scfm_fast.pretrain.objectives import mlm_loss_sum
    from scfm_fast.pretrain.presets import PretrainOptions

    dev = torch.device(args.device)
    amp = args.dtype == "bfloat16"
    opts = PretrainOptions(out="-", preset=args.shape, dropout=0.0, token_dictionary=args.token_dictionary).resolved()
    vocab, specials, _ = dataset_vocab([args.tokens], token_dictionary=args.token_dictionary)
    cfg = model_config(opts, vocab_size=vocab, specials=specials)
    corpus = Corpus([args.tokens], max_len=cfg.max_position_embeddings, truncate=True)
    masker = Masker(vocab_size=vocab, mask_id=specials["<mask>"], protected=protected_ids(specials, protect_special=False))
    order = np.random.default_rng(0).permutation(len(corpus))
    n_cells = args.steps * args.batch_cells
    cells = order[:n_cells] if n_cells <= len(corpus) else order[np.arange(n_cells) % len(corpus)]
    lens = corpus.lengths[cells]
    # HF: length-grouped padded batches of batch_cells; ours: the same cells packed to the same mean tokens
    hf_batches = [cells[b] for b in megabatch_batches(lens, max_tokens=1 << 62, megabatch=len(cells),
                                                       max_cells=args.batch_cells)]
    budget = int(np.ceil(lens.sum() / args.steps))
    our_batches = [cells[b] for b in megabatch_batches(lens, max_tokens=budget, megabatch=len(cells))]
    peak = peak_flops(dev, torch.bfloat16 if amp else torch.float32)
    results = {}

    torch.manual_seed(0)
    model, head = build_model(cfg, init=None)
    init = {**{f"bert.{k}": v.clone() for k, v in model.state_dict().items()},
            **{f"cls.predictions.{k}": v.clone() for k, v in head.state_dict().items() if k != "decoder.weight"}}
    model.to(dev).train()
    head.to(dev).train()
    opt = make_optimizer(model, head, opts, dev)
    flops = 0.0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    batches = [make_batch(corpus, masker, b, epoch=0) for b in our_batches]
    for i, b in enumerate([batches[0], *batches]):  # the first pass is an untimed warm-up
        if i == 1:
            _sync(dev)
            t0 = time.perf_counter()
            flops = 0.0
        b.packed = b.packed.to(dev)
        b.label_pos, b.labels = b.label_pos.to(dev), b.labels.to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            ls, _ = mlm_loss_sum(model, head, b)
        (ls / max(1, b.labels.numel())).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        flops += train_flops(cfg, np.diff(b.packed.cu_seqlens.cpu().numpy()), b.labels.numel())
    _sync(dev)
    sec = time.perf_counter() - t0
    results["scfm_packed"] = {"tokens_per_s": float(lens.sum()) / sec, "mfu": flops / sec / peak,
                              "peak_memory_gb": torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None}

    hf_cfg = transformers.BertConfig(**cfg.to_hf_dict(), attn_implementation="sdpa")
    hf = transformers.BertForMaskedLM(hf_cfg)
    hf.load_state_dict(init, strict=False)
    hf.to(dev).train()
    hopt = torch.optim.AdamW(hf.parameters(), lr=opts.lr)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    padded = []
    for b in hf_batches:
        mb = make_batch(corpus, masker, b, epoch=0)
        cu = mb.packed.cu_seqlens.tolist()
        L = max(cu[i + 1] - cu[i] for i in range(len(b)))
        ids = torch.full((len(b), L), specials["<pad>"], dtype=torch.long)
        att = torch.zeros(len(b), L, dtype=torch.long)
        lab = torch.full((len(b), L), -100, dtype=torch.long)
        flat = torch.full((cu[-1],), -100, dtype=torch.long)
        flat[mb.label_pos] = mb.labels
        for i in range(len(b)):
            n = cu[i + 1] - cu[i]
            ids[i, :n], att[i, :n], lab[i, :n] = mb.packed.input_ids[cu[i]:cu[i + 1]], 1, flat[cu[i]:cu[i + 1]]
        padded.append((ids, att, lab))
    for i, (ids, att, lab) in enumerate([padded[0], *padded]):  # the first pass is an untimed warm-up
        if i == 1:
            _sync(dev)
            t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = hf(input_ids=ids.to(dev), attention_mask=att.to(dev), labels=lab.to(dev)).loss
        loss.backward()
        hopt.step()
        hopt.zero_grad(set_to_none=True)
    _sync(dev)
    sec = time.perf_counter() - t0
    results["hf_padded"] = {"tokens_per_s": float(lens.sum()) / sec, "mfu": flops / sec / peak,
                            "peak_memory_gb": torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None}
    results["speedup"] = results["scfm_packed"]["tokens_per_s"] / results["hf_padded"]["tokens_per_s"]
    results["setup"] = {"shape": args.shape, "device": str(dev), "dtype": args.dtype, "cells": int(len(cells)),
                        "non_pad_tokens": int(lens.sum()), "vocab": vocab}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
