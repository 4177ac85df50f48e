"""Real GeneCompass token datasets for the perturbation tests: bundled human PBMC and mouse dentate gyrus
cells tokenized with ``--preset genecompass`` over one joint dictionary, and a small random GeneCompass
model over it (weights scaled up so that perturbation effects are far above float noise)."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

MOUSE = Path(__file__).resolve().parents[1] / "data" / "mouse_dentategyrus_24cells.h5ad"
MAX_LEN = 40  # genes per cell (the cells are longer: every cell has 40)
N_POS = 48  # the model's positions: --no-attention-mask pads every cell and variant to 48


def tokenize_human_mouse(tmp: Path, pbmc_path: Path, *, n_human: int = 10, n_mouse: int = 10) -> tuple[Path, Path]:
    """``(token dataset dir, token dictionary pickle)``: human cells first, then mouse cells."""
    import anndata as ad

    from scfm_fast.tokenizer.pipeline import tokenize_corpus
    from scfm_fast.vocab import load_gene_name_map
    from scfm_fast.vocab.ensembl import load_gene_table
    from tests._genecompass import joint_dictionaries

    human = ad.read_h5ad(pbmc_path)[:n_human].copy()
    human.obs["organism"] = "human"
    mouse = ad.read_h5ad(MOUSE)[:n_mouse].copy()
    mouse.obs["organism"] = "mouse"
    names = load_gene_name_map()
    human_ids = [names[s] for s in human.var_names if s in names]
    table = load_gene_table("mouse")
    table = table[~table["gene_name"].duplicated(keep=False) & (table["gene_name"] != "")]
    mouse_ids = table[table["gene_name"].isin(set(mouse.var_names))]["gene_id"].tolist()
    tok, med = joint_dictionaries(tmp, human_ids, mouse_ids)
    hp, mp = tmp / "human.h5ad", tmp / "mouse.h5ad"
    human.write_h5ad(hp)
    mouse.write_h5ad(mp)
    out = tmp / "tokens"
    tokenize_corpus([hp, mp], out, preset="genecompass", token_dictionary=tok, gene_median=med,
                    species_column="organism", max_len=MAX_LEN, progress_bar=False)
    return out, tok


def random_model(token_dictionary: Path, *, seed: int = 0):
    """A 2-layer GeneCompass model (hidden 24) over the dictionary; mouse genes read some human gene's priors."""
    from scfm_fast.model.config import EncoderConfig
    from scfm_fast.model.genecompass import GeneCompassConfig, GeneCompassModel

    with open(token_dictionary, "rb") as f:
        d = pickle.load(f)
    vocab = len(d)
    n_human = sum(k.startswith("ENSG") for k in d)
    torch.manual_seed(seed)
    enc = EncoderConfig(vocab_size=vocab, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                        intermediate_size=40, hidden_act="gelu", max_position_embeddings=N_POS)
    model = GeneCompassModel(GeneCompassConfig(encoder=enc, knowledge_dim=8)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" not in name and "cat_ln" not in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        e = model.bert.embeddings
        for k in model.gcfg.knowledge:
            getattr(e, f"{k}_knowledge").copy_(torch.randn(vocab, 8, generator=g))
        e.homologous_index[2 + n_human:] = 2 + torch.arange(vocab - 2 - n_human) % n_human
    return model

