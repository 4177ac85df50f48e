"""The README's main job on the bundled real data: ``./dev.sh demo`` (``python -m scfm_fast.demo OUT``).

Expects ``OUT/tokens`` from ``scfm tokenize`` (dev.sh runs it first), then:

1. summarises the token dataset and plots cell lengths and the genes ranked first most often;
2. builds a model with the Geneformer V1-6L shape, saved as a Hugging Face checkpoint. Its weights
   are **random** (real checkpoints cannot be downloaded here): pass ``--model CKPT`` to use real ones;
3. embeds every cell (unpadded fast path) to Parquet and plots a PCA of the embeddings;
4. runs an exact in-silico deletion screen of a few genes in a few cells, checks one cell against
   the one-forward-per-variant reference, and writes the results table, gene statistics and plot.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def _plot_tokens(store, vocab, names, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = store.lengths
    first = np.array([store[i][0] for i in range(len(store))])
    top, counts = np.unique(first, return_counts=True)
    order = np.argsort(-counts)[:15]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].hist(lengths, bins=30, color="#4477aa")
    ax[0].set(xlabel="tokens per cell (genes, truncated at 2,048)", ylabel="cells", title="Cell lengths")
    labels = [names.get(vocab.gene_of_token.get(int(t), ""), vocab.gene_of_token.get(int(t), str(t))) for t in top[order]]
    ax[1].barh(labels[::-1], counts[order][::-1], color="#cc6677")
    ax[1].set(xlabel="cells where the gene is ranked first", title="Top-ranked genes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="demo output directory holding tokens/")
    ap.add_argument("--model", default=None, help="a real Hugging Face BERT checkpoint (default: random V1-6L)")
    ap.add_argument("--perturb-cells", type=int, default=6)
    args = ap.parse_args(argv)
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from .embed import embed_tokens
    from .embed.plot import plot_embedding_pca
    from .model.bert import BertEncoderModel
    from .model.checkpoint import load_encoder, save_encoder
    from .model.config import EncoderConfig
    from .perturb import gene_stats, perturb_cells, perturb_cells_reference, plot_gene_stats
    from .store import TokenStore
    from .vocab import GeneVocab
    from .vocab.dictionaries import bundled_dir
    from .vocab.gene_ids import load_gene_name_map

    out = Path(args.out)
    store = TokenStore(out / "tokens")
    man = store.manifest
    vocab = GeneVocab.load()
    symbol_of = {v: k for k, v in load_gene_name_map().items()}
    gm = man["gene_match"][0]
    print(f"[1/4] tokens: {len(store)} cells, {man['n_tokens']:,} tokens, median length "
          f"{int(np.median(store.lengths))}; {gm['n_matched_genes']:,}/{gm['n_input_genes']:,} genes matched")
    _plot_tokens(store, vocab, symbol_of, out / "tokens_summary.png")

    torch.manual_seed(0)
    if args.model:
        model, ckpt = load_encoder(args.model), Path(args.model)
    else:
        cfg = EncoderConfig.from_json(bundled_dir("geneformer_v1") / "config_6L_30M.json")
        model = BertEncoderModel(cfg)
        with torch.no_grad():  # BERT's initialiser; PyTorch's default leaves the layers nearly linear
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, cfg.initializer_range)
        ckpt = save_encoder(model, out / "model_random_v1_6L")
        model = load_encoder(ckpt)
    print(f"[2/4] model: {ckpt} ({'given' if args.model else 'RANDOM weights, Geneformer V1-6L shape'})")

    t0 = time.perf_counter()
    emb, _ = embed_tokens(out / "tokens", model, layer=-2)
    dt = time.perf_counter() - t0
    pq.write_table(pa.table({"cell_index": np.asarray(store.cell_index),
                             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1])}),
                   out / "cell_embeddings.parquet")
    plot_embedding_pca(emb, store.lengths, out / "embeddings_pca.png", label="tokens per cell",
                       title="Cell embeddings (random-weight V1-6L)" if not args.model else "Cell embeddings")
    embed_rate = len(store) / dt
    print(f"[3/4] embedded {len(store)} cells at layer -2 in {dt:.1f} s ({len(store) / dt:.1f} cells/s, CPU) "
          f"-> cell_embeddings.parquet, embeddings_pca.png")

    cells = [store[i][:256] for i in range(args.perturb_cells)]  # first 256 genes keep the CPU demo short
    # the five genes most often ranked in these cells' top 20, by Ensembl id
    top, cnt = np.unique(np.concatenate([c[:20] for c in cells]), return_counts=True)
    genes = [vocab.gene_of_token[int(t)] for t in top[np.argsort(-cnt, kind="stable")[:5]]]
    t0 = time.perf_counter()
    res = perturb_cells(cells, model, perturbation="delete", genes=genes, layer=-2, progress_bar=False)
    dt = time.perf_counter() - t0
    ref = perturb_cells_reference(cells[:1], model, perturbation="delete", genes=genes, layer=-2, progress_bar=False)
    err = float(np.abs(res[res.cell_index == 0].sort_values("gene_token").cos_sim.to_numpy()
                       - ref.sort_values("gene_token").cos_sim.to_numpy()).max())
    res.to_parquet(out / "perturbations.parquet")
    stats = gene_stats(res)
    stats.to_parquet(out / "gene_stats.parquet")
    plot_gene_stats(stats, out / "gene_stats.png")
    print(f"[4/4] deleted {len(genes)} genes in {args.perturb_cells} cells: {len(res)} perturbations in {dt:.1f} s; "
          f"exact engine vs reference max |dcos| = {err:.1e} -> perturbations.parquet, gene_stats.parquet/.png")
    (out / "demo_summary.json").write_text(json.dumps({
        "cells": len(store), "tokens": man["n_tokens"], "embed_cells_per_s": embed_rate,
        "perturbations": len(res), "exact_vs_reference_max_abs_dcos": err, "model": str(ckpt),
        "random_weights": not bool(args.model)}, indent=1))
    print(f"done: see {out}/ (plots: tokens_summary.png, embeddings_pca.png, gene_stats.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
