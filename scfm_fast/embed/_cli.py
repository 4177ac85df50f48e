"""``scfm embed``: cell (and gene) embeddings of a token dataset, to Parquet and NumPy."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``embed`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser("embed", help="cell / gene embeddings of a token dataset",
                              description="Embed every cell of TOKENS_DIR with a Hugging Face BERT checkpoint; "
                                          "writes OUT/cell_embeddings.parquet and .npy (and gene_embeddings.parquet "
                                          "with --genes).")
    p.add_argument("tokens", metavar="TOKENS_DIR")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + weights)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layer", type=int, default=-1, help="hidden layer (-1 last, -2 second to last, 0 embeddings)")
    p.add_argument("--pool", default="mean", choices=["mean", "cls"])
    p.add_argument("--genes", action="store_true", help="also write per-gene embeddings")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-tokens", type=int, default=None)
    p.set_defaults(func=run)


def run(args: Any) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from ..model.checkpoint import load_encoder
    from ..store import TokenStore
    from .cells import embed_tokens

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_encoder(args.model, device=device)
    store = TokenStore(args.tokens)
    emb, gene = embed_tokens(args.tokens, model, layer=args.layer, pooling=args.pool, genes=args.genes,
                             batch_tokens=args.batch_tokens, device=device, dtype=args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hidden = emb.shape[1]
    tmp = out / ".cell_embeddings.parquet.tmp"
    pq.write_table(pa.table({
        "cell_index": np.asarray(store.cell_index), "file_index": np.asarray(store.file_index),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), hidden)}), tmp)
    tmp.replace(out / "cell_embeddings.parquet")
    np.save(out / "cell_embeddings.npy", emb)
    if gene is not None:
        vocab = {}
        from ..store import read_manifest

        man = read_manifest(args.tokens)
        try:
            from ..vocab import GeneVocab

            vocab = GeneVocab.load(preset=man["config"].get("preset", "geneformer-v1")).gene_of_token
        except Exception:  # noqa: BLE001 - names are a convenience; tokens are the key
            vocab = {}
        tmp = out / ".gene_embeddings.parquet.tmp"
        pq.write_table(pa.table({
            "token": gene["token"], "ensembl_id": [vocab.get(int(t), "") for t in gene["token"]], "n": gene["n"],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(gene["embedding"].ravel()), hidden)}), tmp)
        tmp.replace(out / "gene_embeddings.parquet")
    (out / "embed_info.json").write_text(json.dumps(
        {"tokens": str(args.tokens), "model": str(args.model), "layer": args.layer, "pooling": args.pool,
         "device": device, "dtype": args.dtype, "n_cells": int(emb.shape[0]), "hidden": hidden}, indent=1))
    print(f"wrote {emb.shape[0]:,} x {hidden} cell embeddings to {out}", file=sys.stderr)
    return 0
