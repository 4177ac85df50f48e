"""``scfm pretrain``: argument parsing over :func:`scfm_fast.pretrain.pretrain_model`."""

from __future__ import annotations

import json
import sys


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def register(sub) -> None:
    """Add the ``pretrain`` subcommand to ``scfm``'s subparsers."""
    from .presets import PRESETS

    p = sub.add_parser("pretrain", help="masked-LM pretraining from token datasets (torchrun for several GPUs)",
                       description="Pretrain a Geneformer-family BERT on TOKENS_DIR... (scfm tokenize output) "
                                   "with packed varlen batches; checkpoints load as BertForMaskedLM.")
    p.add_argument("tokens", nargs="+", metavar="TOKENS_DIR")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", choices=sorted(PRESETS), help="published model shape + recipe")
    g.add_argument("--config", metavar="CONFIG.json", help="a BERT config.json (its vocab must match the data)")
    p.add_argument("--init", metavar="CKPT", help="continue pretraining from a Hugging Face checkpoint")
    p.add_argument("--token-dictionary", metavar="PKL",
                   help="the token dictionary the data were tokenized with (default: the bundled one, if it is)")
    p.add_argument("--knowledge", metavar="NAME=PKL,...",
                   help="GeneCompass from scratch: the four prior-knowledge tables promoter=, co_exp=, gene_family=, "
                        "peca_grn= (pickles of gene id -> vector, keyed like --token-dictionary), or GeneCompass's "
                        "released per-species files NAME_human=, NAME_mouse= (symbol -> vector) with id2name= "
                        "(gene id -> symbol)")
    p.add_argument("--homologs", metavar="FILE",
                   help="GeneCompass from scratch: the mouse -> human homolog remap, from GeneCompass's "
                        "homologous_hm_token.pickle (human token -> mouse token) or a two-column TSV (human gene "
                        "id, mouse gene id); default: none (mouse genes keep their own knowledge rows)")
    s = p.add_mutually_exclusive_group()
    s.add_argument("--max-steps", type=int)
    s.add_argument("--epochs", type=float)
    p.add_argument("--batch-tokens", type=int, default=16_384, help="tokens per micro-batch per process")
    b = p.add_mutually_exclusive_group()
    b.add_argument("--global-batch-cells", type=int, help="cells per optimiser step (sets gradient accumulation)")
    b.add_argument("--global-batch-tokens", type=int, help="tokens per optimiser step (sets gradient accumulation)")
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=float, help="warm-up steps (>= 1) or fraction of the run (< 1)")
    p.add_argument("--schedule", choices=["linear", "cosine"])
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--mask-prob", type=float, default=0.15)
    p.add_argument("--protect-special", action="store_true", help="never select <cls>/<eos> for masking")
    p.add_argument("--dropout", type=float)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--eval-fraction", type=float, default=0.0)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR's latest complete checkpoint")
    p.add_argument("--shard", choices=["fsdp"])
    p.add_argument("--dataset-weights", type=_floats, metavar="w1,w2")
    p.add_argument("--truncate", action="store_true", help="cut cells longer than the model's positions")
    p.add_argument("--log-every", type=int, default=10)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from .loop import pretrain_model

    opts = {k: v for k, v in vars(args).items() if k not in ("tokens", "out", "func", "command", "verbose")}
    res = pretrain_model(args.tokens, out=args.out, **opts)
    print(json.dumps(res), file=sys.stderr)
    return 0
