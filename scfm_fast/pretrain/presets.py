"""Published pretraining recipes (``/work/shared/PRETRAINING.md``) and the run's options."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .._errors import UsageError

# Geneformer V1's recipe (both sizes); the 12-layer shape is that of the published gf-12L-30M model
_V1_RECIPE = dict(lr=1e-3, schedule="linear", warmup=10_000, weight_decay=0.001, dropout=0.02, epochs=3,
                  cells_per_gpu=12)

# shape + optimiser recipe; the vocabulary always comes from the token dataset
PRESETS: dict[str, dict[str, Any]] = {
    "geneformer-v1-6l": dict(model=dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                                        intermediate_size=512, hidden_act="relu", max_position_embeddings=2048),
                             **_V1_RECIPE),
    "geneformer-v1-12l": dict(model=dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                                         intermediate_size=1024, hidden_act="relu", max_position_embeddings=2048),
                              **_V1_RECIPE),
    "geneformer-v2-104m": dict(
        model=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   hidden_act="relu", max_position_embeddings=4096),
        lr=2e-4, schedule="cosine", warmup=0.007, weight_decay=0.001, dropout=0.1, epochs=3, cells_per_gpu=18),
    "mouse-geneformer": dict(
        model=dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512,
                   hidden_act="silu", max_position_embeddings=2048),
        lr=1e-3, schedule="cosine", warmup=10_000, weight_decay=0.001, dropout=0.02, epochs=10, cells_per_gpu=12),
    # GeneCompass (../shared/GENECOMPASS.md, Training): trains a GeneCompassModel on GeneCompass tokens
    "genecompass-base": dict(
        family="genecompass",
        model=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   hidden_act="gelu", max_position_embeddings=2048),
        lr=5e-5, schedule="linear", warmup=10_000, weight_decay=0.01, dropout=0.02, cells_per_gpu=10),
}


@dataclass
class PretrainOptions:
    """Every option of ``scfm pretrain`` (see :func:`scfm_fast.pretrain.pretrain_model`)."""

    out: str
    preset: str | None = None
    config: str | None = None
    init: str | None = None
    token_dictionary: str | None = None
    knowledge: dict[str, str] | None = None  # GeneCompass from scratch: table name -> pickle (gene id -> vector)
    homologs: str | None = None  # GeneCompass from scratch: homolog pickle / TSV (mouse -> human remap)
    max_steps: int | None = None
    epochs: float | None = None
    batch_tokens: int = 16_384
    global_batch_cells: int | None = None
    global_batch_tokens: int | None = None
    lr: float | None = None
    warmup: float | None = None  # steps (>= 1) or a fraction of the run (< 1)
    schedule: str | None = None
    weight_decay: float | None = None
    grad_clip: float = 1.0
    mask_prob: float = 0.15
    protect_special: bool = False
    dropout: float | None = None
    dtype: str = "bfloat16"
    grad_checkpointing: bool = False
    eval_fraction: float = 0.0
    eval_every: int = 0
    save_every: int = 1000
    seed: int = 0
    deterministic: bool = False
    resume: bool = False
    shard: str | None = None
    dataset_weights: list[float] | None = None
    truncate: bool = False
    log_every: int = 10
    progress: bool | None = True
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> PretrainOptions:
        """Fill what the user left unset from the preset (or generic defaults), and check the values."""
        rec = PRESETS.get(self.preset or "", {})
        if self.preset is not None and self.preset not in PRESETS:
            msg = f"unknown --preset {self.preset!r}; choose one of {sorted(PRESETS)}"
            raise UsageError(msg)
        if (self.preset is None) == (self.config is None) and self.init is None:
            msg = "pass exactly one of --preset NAME or --config CONFIG.json (or --init CKPT)"
            raise UsageError(msg)
        from .knowledge import parse_knowledge

        o = replace(self, knowledge=parse_knowledge(self.knowledge), lr=_pick(self.lr, rec.get("lr"), 1e-3),
                    warmup=_pick(self.warmup, rec.get("warmup"), 0),
                    schedule=_pick(self.schedule, rec.get("schedule"), "linear"),
                    weight_decay=_pick(self.weight_decay, rec.get("weight_decay"), 0.0),
                    dropout=_pick(self.dropout, rec.get("dropout"), None))
        if o.schedule not in ("linear", "cosine"):
            msg = f"--schedule must be linear or cosine, got {o.schedule!r}"
            raise UsageError(msg)
        if o.dtype not in ("bfloat16", "float32"):
            msg = f"--dtype must be bfloat16 or float32, got {o.dtype!r}"
            raise UsageError(msg)
        if o.max_steps is not None and o.epochs is not None:
            msg = "pass --max-steps or --epochs, not both"
            raise UsageError(msg)
        if o.global_batch_cells is not None and o.global_batch_tokens is not None:
            msg = "pass --global-batch-cells or --global-batch-tokens, not both"
            raise UsageError(msg)
        if o.batch_tokens < 1 or (o.max_steps is not None and o.max_steps < 1):
            msg = "--batch-tokens and --max-steps must be >= 1"
            raise UsageError(msg)
        if not 0.0 <= o.eval_fraction < 1.0:
            msg = f"--eval-fraction must be in [0, 1), got {o.eval_fraction}"
            raise UsageError(msg)
        if o.shard not in (None, "none", "fsdp"):
            msg = f"--shard must be fsdp, got {o.shard!r}"
            raise UsageError(msg)
        return o

    def fingerprint(self) -> dict[str, Any]:
        """The options a resumed run must share (everything that changes the data order or the model)."""
        keep = ("preset", "config", "init", "knowledge", "homologs", "batch_tokens", "global_batch_cells", "global_batch_tokens", "lr",
                "warmup", "schedule", "weight_decay", "mask_prob", "protect_special", "dropout", "dtype", "seed",
                "eval_fraction", "dataset_weights", "truncate", "max_steps", "epochs", "grad_clip")
        return {k: v for k, v in asdict(self).items() if k in keep}


def _pick(*vals):
    return next((v for v in vals if v is not None), None)
