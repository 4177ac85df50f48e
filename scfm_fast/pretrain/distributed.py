"""``--shard fsdp``: the encoder + MLM head under FSDP2 (``torch.distributed.fsdp.fully_shard``).

One FSDP unit holds the whole model: :class:`~scfm_fast.model.layers.EncoderParams` reads the layers' weights
straight from the modules instead of calling each ``BertLayer`` (whose ``__call__`` is where per-layer FSDP
units all-gather and reduce-scatter), so a per-layer unit would hand it sharded tensors. The unit also keeps
the tied decoder (the word embeddings) one parameter. Between steps parameters, gradients and the AdamW
state are sharded over the ranks; a micro-batch's forward all-gathers them and its backward
reduce-scatters the gradients (summed, as the plain data-parallel path sums them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..model.bert import BertEncoderModel
from ..model.config import EncoderConfig
from ..model.heads import MLMHead
from .objectives import mlm_loss_sum


class MLMPair(nn.Module):
    """Encoder + MLM head as one module, so FSDP's hooks wrap a whole masked-LM forward."""

    def __init__(self, model: BertEncoderModel, head: MLMHead) -> None:
        super().__init__()
        self.bert = model
        self.head = head

    def forward(self, batch, *, grad_checkpointing: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed CE, n correct) of a masked micro-batch; an empty one gives zeros (every rank must run
        the same number of forward/backward passes, since each one all-gathers and reduce-scatters)."""
        if batch.n_cells == 0:
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            return zero.float(), torch.zeros((), dtype=torch.long, device=zero.device)
        if grad_checkpointing:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(mlm_loss_sum, self.bert, self.head, batch, use_reentrant=False)
        return mlm_loss_sum(self.bert, self.head, batch)


def shard(model: BertEncoderModel, head: MLMHead, *, bf16: bool) -> MLMPair:
    """Shard ``model`` + ``head`` (full, identical weights on every rank) in place; returns the FSDP module.

    With ``bf16`` the forward/backward run on bfloat16 copies of the parameters and gradients are reduced in
    float32 (the sharded master weights and AdamW state stay float32).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    pair = MLMPair(model, head)
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
          else MixedPrecisionPolicy())
    fully_shard(pair, mp_policy=mp)
    # the loss is already normalised by the global count of selected tokens: sum over ranks, do not average;
    # plain SUM collectives (no PREMUL_SUM / AVG op, which gloo lacks) with no division afterwards
    pair.set_gradient_divide_factor(1.0)
    pair.set_force_sum_reduction_for_comms(True)
    return pair


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """``clip_grad_norm_`` over sharded (DTensor) gradients; returns the global norm."""
    n = torch.nn.utils.clip_grad_norm_(params, max_norm)
    full = getattr(n, "full_tensor", None)
    return float(full() if full is not None else n)


def _options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def gather_for_save(pair: MLMPair, optimizer: torch.optim.Optimizer, *,
                    cfg: EncoderConfig) -> tuple[BertEncoderModel | None, MLMHead | None, dict | None]:
    """Collective: full weights as an unsharded CPU (model, head) and the full optimiser state, on rank 0 only
    (other ranks get ``None``s)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    sd = get_model_state_dict(pair, options=_options(cpu_offload=True))
    osd = get_optimizer_state_dict(pair, optimizer, options=_options(cpu_offload=True))
    if dist.get_rank() != 0:
        return None, None, None
    model = BertEncoderModel(cfg)
    head = MLMHead(cfg, tied_to=model.embeddings.word_embeddings)
    missing, unexpected = MLMPair(model, head).load_state_dict(sd, strict=False)
    if missing or unexpected:  # a silent partial copy would publish a wrong checkpoint
        msg = f"FSDP full state dict does not match the model: missing {missing}, unexpected {unexpected}"
        raise RuntimeError(msg)
    return model, head, osd


def load_optimizer(pair: MLMPair, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimiser state saved by :func:`gather_for_save` into the sharded optimiser."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(pair, optimizer, state, options=_options())


def unsharded(pair: MLMPair):
    """Context manager: the full parameters on every rank (for evaluation, where ranks run different numbers of
    batches and so cannot meet in per-forward collectives)."""
    from contextlib import contextmanager

    @contextmanager
    def cm():
        pair.unshard()
        try:
            yield
        finally:
            pair.reshard()

    return cm()
