"""``pretrain``: the masked-LM training loop (single process or torchrun data parallel)."""

from __future__ import annotations

import logging
import os
import resource
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from .._errors import ScfmError, UsageError
from .._progress import progress
from ..loader import token_budget_batches
from ..store.reader import read_manifest
from . import distributed as fsdp
from .build import (
    build_model,
    dataset_vocab,
    load_weights,
    make_optimizer,
    make_scheduler,
    model_config,
)
from .checkpoints import load_trainer_state, prepare_run_dir, save_checkpoint
from .data import Corpus, EpochPlan, Prefetcher, make_batch, plan_epoch, split_eval
from .genecompass import build_genecompass, is_genecompass_run
from .masking import EVAL_EPOCH, Masker, protected_ids
from .metrics import MetricsLog, peak_flops, plot_loss, train_flops
from .objectives import GeneCompassObjective, mlm_loss_sum
from .presets import PRESETS, PretrainOptions


class NonFiniteLossError(ScfmError, RuntimeError):
    """The loss became NaN or infinite; the run stopped before applying that step."""


def pretrain_model(tokens: Sequence[str | os.PathLike], *, out: str | os.PathLike, **options: Any) -> dict[str, Any]:
    """Masked-LM pretraining of a BERT encoder from token datasets (``scfm pretrain``).

    Parameters
    ----------
    tokens
        Token dataset directories (``scfm tokenize`` output), all made with one token dictionary.
    out
        Run directory: ``run.json``, ``metrics.jsonl``, ``loss.png``, ``checkpoint-STEP/``.
    **options
        Keyword-only options named as the CLI flags (``preset``, ``config``, ``init``, ``max_steps``,
        ``epochs``, ``batch_tokens``, ``global_batch_cells``, ``global_batch_tokens``, ``lr``, ``warmup``,
        ``schedule``, ``weight_decay``, ``grad_clip``, ``mask_prob``, ``protect_special``, ``dropout``,
        ``dtype``, ``grad_checkpointing``, ``eval_fraction``, ``eval_every``, ``save_every``, ``seed``,
        ``deterministic``, ``resume``, ``shard``, ``dataset_weights``, ``truncate``, ``token_dictionary``,
        ``knowledge``, ``homologs``); see :class:`~scfm_fast.pretrain.presets.PretrainOptions`.
        ``knowledge`` (GeneCompass from scratch): the four prior-knowledge tables, ``"promoter=A.pkl,..."``
        or a mapping of table name (``promoter``, ``co_exp``, ``gene_family``, ``peca_grn``, each also as
        ``NAME_human`` / ``NAME_mouse`` for GeneCompass's per-species symbol files, plus ``id2name``) to a
        pickle of gene id (or symbol) -> vector (:func:`~scfm_fast.pretrain.knowledge.parse_knowledge`).
        ``homologs`` (GeneCompass from scratch): the mouse -> human homolog remap, a pickle or TSV. Both
        need ``token_dictionary``; with ``init`` the checkpoint's tables and remap are used instead.

    Returns
    -------
    dict with ``step``, ``last_checkpoint``, ``loss``, ``eval_loss`` and ``status``
    (``"complete"`` or ``"interrupted"``).
    """
    opts = PretrainOptions(out=str(out), **options).resolved()
    paths = [str(p) for p in tokens]
    weights = opts.dataset_weights or [1.0] * len(paths)
    if len(weights) != len(paths) or any(not w > 0 for w in weights):
        msg = f"--dataset-weights needs {len(paths)} positive numbers (one per TOKENS_DIR), got {weights}"
        raise UsageError(msg)
    vocab, specials, dict_hash = dataset_vocab(paths, token_dictionary=opts.token_dictionary)
    gc = is_genecompass_run(paths, opts)  # GeneCompass tokens train a GeneCompassModel (its objective, layout)
    cfg = model_config(opts, vocab_size=vocab, specials=specials)
    corpus = Corpus(paths, max_len=cfg.max_position_embeddings, truncate=opts.truncate)
    rank, world, device = _init_distributed()
    if opts.deterministic:
        torch.use_deterministic_algorithms(mode=True)
    torch.manual_seed(opts.seed)
    np.random.seed(opts.seed)

    train_mask, eval_cells = split_eval(corpus, fraction=opts.eval_fraction, seed=opts.seed)
    per_step = _micro_batches_per_step(opts, corpus, world)
    plan0 = plan_epoch(corpus, train_mask, weights=weights, seed=opts.seed, epoch=0,
                       batch_tokens=opts.batch_tokens, per_step=per_step)
    if plan0.n_steps == 0:
        msg = f"{paths}: no training cells (eval fraction {opts.eval_fraction}); nothing to pretrain on"
        raise UsageError(msg)
    epochs = opts.epochs if opts.epochs is not None else PRESETS.get(opts.preset or "", {}).get("epochs", 1)
    total = opts.max_steps or max(1, int(epochs * plan0.n_steps))

    run_dir = Path(opts.out)
    if opts.shard == "fsdp" and gc:
        msg = "--shard fsdp is implemented and tested for the Geneformer-family BERT only, not GeneCompass models"
        raise UsageError(msg)
    if opts.shard == "fsdp" and world < 2:
        msg = "--shard fsdp shards over processes: start it with torchrun --nproc_per_node N (N >= 2)"
        raise UsageError(msg)
    identity = {"options": opts.fingerprint(), "model": cfg.to_hf_dict(), "world_size": world,
                "micro_batches_per_step": per_step, **({"shard": opts.shard} if opts.shard == "fsdp" else {}),
                "datasets": [{"path": p, "config_hash": read_manifest(p).get("config_hash"),
                              "n_cells": int(s), "token_dictionary": dict_hash} for p, s in zip(paths, corpus.sizes)]}
    resume_from, err = None, None
    if rank == 0:
        try:
            resume_from = prepare_run_dir(run_dir, identity, resume=opts.resume)
        except UsageError as e:
            err = str(e)
    resume_from, err = _broadcast((resume_from, err), world)  # every rank fails alike, none hangs
    if err is not None:
        raise UsageError(err)

    model, head = (build_genecompass(cfg, opts), torch.nn.Module()) if gc else build_model(cfg, init=opts.init)
    objective = GeneCompassObjective() if gc else mlm_loss_sum
    model.to(device).train()
    head.to(device).train()
    if world > 1:  # every rank starts from rank 0's weights (same seed already; this makes it certain)
        for t in list(model.state_dict().values()) + list(head.state_dict().values()):
            dist.broadcast(t, src=0)
    if resume_from is not None:  # before sharding: every rank loads the full weights, FSDP keeps its shard
        load_weights(model, head, resume_from)
    amp = opts.dtype == "bfloat16"
    pair = fsdp.shard(model, head, bf16=amp) if opts.shard == "fsdp" else None
    optimizer = make_optimizer(model, head, opts, device)
    scheduler = make_scheduler(optimizer, opts, total)
    step, epoch, st = 0, 0, 0
    log = MetricsLog(run_dir, enabled=rank == 0)
    if resume_from is not None:
        state = load_trainer_state(resume_from)
        if pair is not None:
            fsdp.load_optimizer(pair, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, (epoch, st) = state["step"], state["cursor"]
        threads = state.get("cpu_threads")
        if opts.deterministic and threads and threads != torch.get_num_threads():
            # CPU sums are split across intra-op threads: the same split keeps the resumed run bit-exact
            log_msg = f"--deterministic resume: {threads} CPU threads, as the run had (was {torch.get_num_threads()})"
            logging.getLogger("scfm_fast").info(log_msg)
            torch.set_num_threads(int(threads))
        log.truncate_after(step)
    if step >= total:
        return {"step": step, "last_checkpoint": str(resume_from), "loss": None, "eval_loss": None,
                "status": "complete"}

    masker = Masker(vocab_size=vocab, mask_id=specials["<mask>"], prob=opts.mask_prob, seed=opts.seed,
                    protected=protected_ids(specials, protect_special=opts.protect_special))

    def plans(e: int = epoch) -> Iterator[tuple[int, EpochPlan]]:
        while True:
            yield e, (plan0 if e == 0 else plan_epoch(corpus, train_mask, weights=weights, seed=opts.seed, epoch=e,
                                                      batch_tokens=opts.batch_tokens, per_step=per_step))
            e += 1

    loader = Prefetcher(corpus, masker, plans(), start_step=st, rank=rank, world_size=world)
    stop = _StopFlag()
    params = list({id(p): p for p in list(model.parameters()) + list(head.parameters())}.values())
    peak = peak_flops(device, torch.bfloat16 if amp else torch.float32) * world
    bar = progress(total=total, desc="pretrain", unit="step", enabled=opts.progress if rank == 0 else False)
    bar.update(step)
    last: dict[str, Any] = {"loss": None, "eval_loss": None}
    last_ckpt = resume_from
    acc = _Window()
    t_last, wait_last = time.perf_counter(), 0.0
    try:
        while step < total:
            epoch, st, batches = next(loader)
            n_sel = _all_reduce(torch.tensor(float(sum(b.labels.numel() for b in batches))), world)
            stats = torch.zeros(5, dtype=torch.float64)  # loss sum, correct, tokens, cells, FLOPs of this rank
            for i, b in enumerate(batches):
                if b.n_cells == 0 and pair is None:  # under FSDP every rank runs every micro-batch
                    continue
                if pair is not None:  # accumulate locally, reduce-scatter once per step (DDP's summation order)
                    pair.set_requires_gradient_sync(i == len(batches) - 1)
                b.to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    ls, c = (pair(b, grad_checkpointing=opts.grad_checkpointing) if pair is not None else
                             _forward(model, head, b, grad_checkpointing=opts.grad_checkpointing, loss_fn=objective))
                (ls / n_sel.clamp(min=1)).backward()
                lens = np.diff(b.packed.cu_seqlens.cpu().numpy())
                stats += torch.tensor([float(ls.detach()), float(c), float(lens.sum()), float(b.n_cells),
                                       train_flops(cfg, lens, b.labels.numel())], dtype=torch.float64)
            if pair is None:
                _sync_grads(params, world)
            g = _all_reduce(stats, world)
            loss = float(g[0] / n_sel.clamp(min=1))
            if not np.isfinite(loss):
                msg = (f"step {step + 1}: the loss is {loss}; stopped before applying it (last good checkpoint: "
                       f"{last_ckpt}); lower --lr, raise --warmup or use --dtype float32")
                raise NonFiniteLossError(msg)
            gnorm = fsdp.clip_grad_norm(params, opts.grad_clip)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            acc.add(g, float(n_sel))
            last["loss"] = loss
            cursor = (epoch, st + 1)
            bar.update(1)
            rec: dict[str, Any] = {}
            if opts.eval_every and eval_cells.size and (step % opts.eval_every == 0 or step == total):
                with fsdp.unsharded(pair) if pair is not None else nullcontext():
                    last["eval_loss"] = rec["eval_loss"] = _evaluate(
                        model, head, corpus, masker, eval_cells, opts, device, rank, world, amp=amp,
                        loss_fn=GeneCompassObjective() if gc else mlm_loss_sum)
            if step % opts.log_every == 0 or step == total or rec:
                now = time.perf_counter()
                rec.update(acc.flush(now - t_last, loader.wait_s - wait_last, peak, device),
                           step=step, epoch=epoch, lr=lr, grad_norm=gnorm)
                t_last, wait_last = now, loader.wait_s
                if gc:  # this process's id and value terms of the GeneCompass loss
                    rec.update(objective.flush())
                log.write(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:,.0f}", lr=f"{lr:.2e}")
            stopping = _all_reduce(torch.tensor(float(stop.hit)), world).item() > 0
            if (opts.save_every and step % opts.save_every == 0) or step == total or stopping:
                m_full, h_full, o_full = (fsdp.gather_for_save(pair, optimizer, cfg=cfg) if pair is not None
                                          else (model, head, optimizer.state_dict() if rank == 0 else None))
                if rank == 0:
                    last_ckpt = save_checkpoint(run_dir, step, model=m_full, head=h_full, trainer={
                        "optimizer": o_full, "scheduler": scheduler.state_dict(),
                        "step": step, "cursor": cursor, "identity": identity})
                    plot_loss(run_dir)
                _barrier(world)
            if stopping:
                return {"step": step, "last_checkpoint": str(last_ckpt), **last, "status": "interrupted"}
    finally:
        loader.close()
        stop.restore()
        bar.close()
    return {"step": step, "last_checkpoint": str(last_ckpt), **last, "status": "complete"}


def _forward(model, head, batch, *, grad_checkpointing: bool, loss_fn=mlm_loss_sum):
    if not grad_checkpointing:
        return loss_fn(model, head, batch)
    # recompute the encoder's activations in backward instead of keeping them
    return checkpoint(loss_fn, model, head, batch, use_reentrant=False)


@torch.no_grad()
def _evaluate(model, head, corpus: Corpus, masker: Masker, cells: np.ndarray, opts: PretrainOptions,
              device: torch.device, rank: int, world: int, *, amp: bool, loss_fn=mlm_loss_sum) -> float:
    """Masked-LM loss on the held-out cells, with fixed masks (the eval epoch key)."""
    model.eval()
    head.eval()
    tot = torch.zeros(2, dtype=torch.float64)
    for idx in token_budget_batches(corpus.lengths[cells], max_tokens=opts.batch_tokens, rank=rank, world_size=world):
        b = make_batch(corpus, masker, cells[idx], epoch=EVAL_EPOCH)
        b.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            ls, _ = loss_fn(model, head, b)
        tot += torch.tensor([float(ls), b.labels.numel()], dtype=torch.float64)
    model.train()
    head.train()
    tot = _all_reduce(tot, world)
    return float(tot[0] / tot[1].clamp(min=1))


class _Window:
    """Sums over the steps since the last log record."""

    def __init__(self) -> None:
        self.sums = np.zeros(5)  # all ranks: loss sum, correct, tokens, cells, FLOPs
        self.sel = 0.0

    def add(self, stats: torch.Tensor, n_sel: float) -> None:
        self.sums += stats.numpy()
        self.sel += n_sel

    def flush(self, seconds: float, wait: float, peak: float, device: torch.device) -> dict[str, Any]:
        loss, correct, toks, cells, flops = self.sums
        sec = max(seconds, 1e-9)
        rec = {"loss": loss / max(self.sel, 1.0), "masked_accuracy": correct / max(self.sel, 1.0),
               "tokens_per_s": toks / sec, "cells_per_s": cells / sec, "data_wait_pct": 100.0 * wait / sec,
               "mfu": flops / sec / peak if peak else None,
               "peak_memory_gb": (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9}
        self.__init__()
        return rec


class _StopFlag:
    """SIGTERM/SIGINT ask for a checkpoint and a clean stop after the current step."""

    def __init__(self) -> None:
        self.hit = False
        self._old = {}
        if _is_main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._set)

    def _set(self, *_):
        self.hit = True

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _micro_batches_per_step(opts: PretrainOptions, corpus: Corpus, world: int) -> int:
    """Micro-batches per optimiser step over all ranks: a multiple of the world size."""
    if opts.global_batch_tokens is not None:
        want = opts.global_batch_tokens / opts.batch_tokens
    elif opts.global_batch_cells is not None:
        want = opts.global_batch_cells * float(corpus.lengths.mean()) / opts.batch_tokens
    else:
        want = world
    return max(world, int(-(-max(1, round(want)) // world)) * world)


def _init_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if cuda:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    return rank, world, dev


def _all_reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else t.device
        x = t.to(dev)
        dist.all_reduce(x)
        return x.to(t.device)
    return t


def _sync_grads(params: list[torch.Tensor], world: int) -> None:
    """Sum gradients over ranks (a rank whose micro-batches were empty contributes zeros)."""
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _broadcast(obj, world: int):
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
