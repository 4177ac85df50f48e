"""Masked-LM loss: the MLM head on selected rows only, and a chunked linear + cross-entropy.

:class:`ChunkedLinearCrossEntropy` computes ``sum_i CE(h_i @ W.T + b, y_i)`` and its gradients chunk by
chunk of rows, so at most ``chunk x V`` logits exist at once (never ``tokens x V``).
:func:`genecompass_loss_sums` is GeneCompass's objective on the same pieces: the chunked CE of its tied MLM
head plus the squared error of its value head, both on the selected rows only; :func:`genecompass_loss`
weighs their means 0.2 / 0.8 as GeneCompass does.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``h @ weight.T + bias`` against ``target``, chunked over rows.

    Logits are formed in ``h``'s dtype (bf16 under autocast) and reduced in (at least) float32. Returns
    ``(loss_sum, n_correct)``; ``n_correct`` (argmax == target) carries no gradient.

    The loss is a sum of per-row terms, so its gradients are known up to the incoming scalar while the
    chunk's logits are at hand: the forward pass computes them (``softmax - onehot`` in place of the
    logits) and the backward pass only scales them. That saves recomputing the logits (a quarter of the
    head's matrix products) and every elementwise pass over ``chunk x V`` values a second time.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor, target: Tensor, chunk: int,  # noqa: D102
                dtype: torch.dtype, need_grad: bool):  # noqa: FBT001 - Function.apply passes positionally
        with torch.autocast(h.device.type, enabled=False):
            loss, correct, grads = _chunked_ce(h, weight, bias, target, chunk=chunk, dtype=dtype,
                                               need_grad=need_grad)
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype)
        if grads is not None:
            ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, g_loss: Tensor, _g_correct: Tensor):  # noqa: D102
        gh, gw, gb = ctx.saved_tensors
        return (*(g.to(g_loss.dtype).mul_(g_loss).to(dt) for g, dt in zip((gh, gw, gb), ctx.dtypes)),
                None, None, None, None)


def _chunked_ce(h: Tensor, weight: Tensor, bias: Tensor, target: Tensor, *, chunk: int, dtype: torch.dtype,
                need_grad: bool) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """(summed CE, n correct, gradients of the summed CE w.r.t. ``h``, ``weight``, ``bias`` or None)."""
    hc_all, w = h.to(dtype), weight.to(dtype)
    acc = torch.promote_types(dtype, torch.float32)  # reductions in at least float32
    b = bias.to(acc)
    loss = torch.zeros((), dtype=acc, device=h.device)
    correct = torch.zeros((), dtype=torch.long, device=h.device)
    if need_grad:
        gh = torch.empty_like(hc_all)
        gw = torch.zeros(weight.shape, dtype=acc, device=h.device)
        gb = torch.zeros(bias.shape, dtype=acc, device=h.device)
    for lo in range(0, h.shape[0], chunk):
        hc, y = hc_all[lo:lo + chunk], target[lo:lo + chunk]
        z = (hc @ w.T).to(acc)  # a fresh tensor: updated in place below (each pass over chunk x V costs)
        z += b
        zy = z.gather(1, y[:, None])[:, 0]
        m, arg = z.max(-1)  # the first maximum, as argmax
        correct += (arg == y).sum()
        z -= m[:, None]
        z.exp_()
        s = z.sum(-1)
        loss += (m + s.log() - zy).sum()
        if need_grad:
            z /= s[:, None]  # softmax
            z[torch.arange(hc.shape[0], device=h.device), y] -= 1.0
            gb += z.sum(0)
            pc = z.to(dtype)
            gh[lo:lo + chunk] = pc @ w
            gw += (pc.T @ hc).to(acc)
    return loss, correct, (gh, gw, gb) if need_grad else None


def linear_cross_entropy(h: Tensor, weight: Tensor, bias: Tensor, target: Tensor, *,
                         chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Summed CE and number of correct argmax predictions of ``h @ weight.T + bias`` (see the class)."""
    if h.shape[0] == 0:
        z = (h.sum() * 0 + weight.sum() * 0 + bias.sum() * 0).float()
        return z, torch.zeros((), dtype=torch.long, device=h.device)
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (h, weight, bias))
    return ChunkedLinearCrossEntropy.apply(h, weight, bias, target, chunk, dtype, need_grad)


def mlm_loss_sum(model, head, batch, *, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Encoder over the packed micro-batch, head on the selected rows only: (summed CE, n correct)."""
    p = batch.packed
    hidden = model.forward_varlen(p.input_ids, p.cu_seqlens, p.max_seqlen, position_ids=p.position_ids)
    sel = head.transform(hidden.index_select(0, batch.label_pos))
    return linear_cross_entropy(sel, head.decoder.weight, head.bias, batch.labels, chunk=chunk)


def genecompass_loss_sums(model, batch, *, chunk: int = 4096) -> tuple[Tensor, Tensor | None, Tensor]:
    """GeneCompass over the packed micro-batch, heads on the selected rows only.

    Returns ``(summed CE of ids, summed squared error of values, n correct)``; the squared error is
    ``None`` for a model without a value head (``use_values`` false).
    """
    p = batch.packed
    h, rows, _ = model.forward_varlen(p.input_ids, batch.values, batch.species, p.cu_seqlens, p.max_seqlen)
    sel = h.index_select(0, rows.index_select(0, batch.label_pos))  # gene rows (species rows skipped)
    pred = model.cls.predictions
    t = pred.transform.LayerNorm(model.act(pred.transform.dense(sel)))
    ce, correct = linear_cross_entropy(t, model.bert.embeddings.word_embeddings.weight, pred.bias, batch.labels,
                                       chunk=chunk)
    if not model.gcfg.use_values:
        return ce, None, correct
    se = (model.value_prediction(sel).float() - batch.label_values.float()).square().sum()
    return ce, se, correct


def genecompass_loss(ce_sum: Tensor, se_sum: Tensor | None, n_selected: Tensor | float) -> Tensor:
    """GeneCompass's loss from the sums: ``0.2 * mean CE(ids) + 0.8 * mean squared error(values)``
    (the mean CE alone without a value head, as its model does)."""
    from ..model.genecompass import ID_LOSS_WEIGHT, VALUE_LOSS_WEIGHT

    if se_sum is None:
        return ce_sum / n_selected
    return (ID_LOSS_WEIGHT * ce_sum + VALUE_LOSS_WEIGHT * se_sum) / n_selected


class GeneCompassObjective:
    """GeneCompass's objective in the trainer's calling convention, ``(loss sum, n correct)``.

    The loss sum is ``0.2 * CE sum + 0.8 * squared-error sum`` (divided by the selected count by the
    loop, this is :func:`genecompass_loss`); the id and value sums are kept for :meth:`flush`, the
    log's ``id_loss`` / ``value_loss`` (this process's batches).
    """

    def __init__(self) -> None:
        self.sums = [0.0, 0.0, 0]  # CE, squared error, selected positions

    def __call__(self, model, head, batch, *, chunk: int = 4096) -> tuple[Tensor, Tensor]:  # noqa: ARG002
        ce, se, correct = genecompass_loss_sums(model, batch, chunk=chunk)
        n = batch.labels.numel()
        self.sums[0] += float(ce.detach())
        self.sums[1] += 0.0 if se is None else float(se.detach())
        self.sums[2] += n
        return genecompass_loss(ce, se, 1.0), correct

    def flush(self) -> dict[str, float]:
        """Mean id and value losses since the last call."""
        ce, se, n = self.sums
        self.sums = [0.0, 0.0, 0]
        return {"id_loss": ce / max(n, 1), "value_loss": se / max(n, 1)}
