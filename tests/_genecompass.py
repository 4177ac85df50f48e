"""A small GeneCompass-style joint dictionary (ENSG + ENSMUSG keys) and h5ad inputs with a species
column, shared by the GeneCompass tokenizer / store / export tests (not a reference implementation)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def joint_dictionaries(tmp: Path, human_genes, mouse_genes, *, seed: int = 0) -> tuple[Path, Path]:
    """Write token / median pickles: ``<pad>`` 0, ``<mask>`` 1, then human and mouse ids."""
    genes = sorted(set(human_genes)) + sorted(set(mouse_genes))
    tokens = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(genes)}}
    rng = np.random.default_rng(seed)
    medians = {g: float(m) for g, m in zip(genes, rng.choice([0.5, 1.0, 1.5, 2.0, 4.0], len(genes)))}
    tok, med = tmp / "gc_tokens.pkl", tmp / "gc_medians.pkl"
    for path, d in ((tok, tokens), (med, medians)):
        with open(path, "wb") as f:
            pickle.dump(d, f)
    return tok, med


def human_mouse_inputs(tmp: Path, pbmc_path: Path, *, n_mouse: int = 60, seed: int = 0):
    """The bundled PBMC file (human symbols) and a synthetic mouse file (mouse symbols from the
    bundled Ensembl table), both with an obs ``organism`` column; plus their Ensembl ids."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from scfm_fast.vocab import load_gene_name_map
    from scfm_fast.vocab.ensembl import load_gene_table

    human = ad.read_h5ad(pbmc_path)
    human.obs["organism"] = "human"
    names = load_gene_name_map()
    human_ids = [names[s] for s in human.var_names if s in names]
    table = load_gene_table("mouse")
    coding = table[(table["gene_biotype"] == "protein_coding") & ~table["gene_name"].duplicated(keep=False)
                   & (table["gene_name"] != "")]
    picked = coding.iloc[::150].head(300)
    rng = np.random.default_rng(seed)
    X = rng.poisson(1.5, (n_mouse, len(picked))) * (rng.random((n_mouse, len(picked))) < 0.5)
    mouse = ad.AnnData(sp.csr_matrix(X.astype(np.float32)), var=pd.DataFrame(index=list(picked["gene_name"])),
                       obs=pd.DataFrame({"organism": ["mouse"] * n_mouse},
                                        index=[f"m{i}" for i in range(n_mouse)]))
    hp, mp = tmp / "human.h5ad", tmp / "mouse.h5ad"
    human.write_h5ad(hp)
    mouse.write_h5ad(mp)
    return hp, mp, human_ids, list(picked["gene_id"])


def fixture_path(shared_dir: Path) -> Path:
    """``shared/genecompass_fixture`` (a checkpoint + outputs of GeneCompass's own code); skips when absent."""
    import pytest

    p = shared_dir / "genecompass_fixture"
    if not p.is_dir():
        pytest.skip(f"GeneCompass fixture not found in {p}")
    return p


def small_genecompass(*, n_layers: int = 2, **switches):
    """A tiny random GeneCompass model (vocabulary 40, hidden 16, knowledge 12) in eval mode, its knowledge
    tables random and ids 30..39 remapped to homologs 2..11 for mouse rows."""
    import torch

    from scfm_fast.model.config import EncoderConfig
    from scfm_fast.model.genecompass import GeneCompassConfig, GeneCompassModel

    enc = EncoderConfig(vocab_size=40, hidden_size=16, num_hidden_layers=n_layers, num_attention_heads=2,
                        intermediate_size=24, hidden_act="gelu", max_position_embeddings=32)
    model = GeneCompassModel(GeneCompassConfig(encoder=enc, knowledge_dim=12, **switches)).eval()
    e = model.bert.embeddings
    for k in model.gcfg.knowledge:
        getattr(e, f"{k}_knowledge").normal_()
    e.homologous_index[30:] = torch.arange(2, 12)
    return model
