"""GeneCompass symbols resolve within the file's declared species (``--species``): upper-cased mouse symbols
("TMSB4X") give the mouse gene, never the human one the joint table spells alike; a lower-cased human symbol
gives the human gene, never the mouse one; Ensembl ids stay ids; a per-cell species column keeps the joint table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scfm_fast._errors import GeneMatchError
from scfm_fast.store import read_table
from scfm_fast.tokenizer.pipeline import tokenize_corpus
from scfm_fast.tokenizer.spec import TokenizerSpec
from scfm_fast.vocab.ensembl import ensembl_name_map
from scfm_fast.vocab.gene_ids import SpeciesNameMap, species_name_map
from tests._genecompass import joint_dictionaries

anndata = pytest.importorskip("anndata")


@pytest.fixture(scope="module")
def genes():
    """``[(mouse symbol, ENSMUSG, human symbol, ENSG)]``: 40 genes whose symbols differ only by case."""
    human, mouse = ensembl_name_map("human"), ensembl_name_map("mouse")
    up_human = {s.upper(): s for s in human if s.isupper() and s.isalnum()}
    out = [(m, mouse[m], up_human[m.upper()], human[up_human[m.upper()]])
           for m in sorted(mouse) if m != m.upper() and m.upper() in up_human]
    return out[:: max(len(out) // 40, 1)][:40]


@pytest.fixture(scope="module")
def dicts(tmp_path_factory, genes):
    tmp = tmp_path_factory.mktemp("gcspecies")
    tok, med = joint_dictionaries(tmp, [g[3] for g in genes], [g[1] for g in genes])
    return tmp, tok, med


def _write(path, var_names, n_cells=12, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.poisson(2.0, (n_cells, len(var_names))) * (rng.random((n_cells, len(var_names))) < 0.6)
    obs = pd.DataFrame({"organism": ["mouse"] * n_cells}, index=[f"c{i}" for i in range(n_cells)])
    anndata.AnnData(sp.csr_matrix(X.astype(np.float32)), obs=obs,
                    var=pd.DataFrame(index=list(var_names))).write_h5ad(path)
    return path


def _tokens(out):
    return read_table(out).column("input_ids").to_pylist()


def _run(paths, out, tok, med, **kw):
    return tokenize_corpus(paths, out, preset="genecompass", token_dictionary=tok, gene_median=med,
                           progress_bar=False, **kw)


def _token_of(tok):
    import pickle

    with open(tok, "rb") as f:
        return pickle.load(f)


def test_upper_cased_mouse_symbols_give_mouse_genes(dicts, genes):
    tmp, tok, med = dicts
    upper = _write(tmp / "mouse_upper.h5ad", [g[0].upper() for g in genes])
    proper = _write(tmp / "mouse_proper.h5ad", [g[0] for g in genes])
    by_id = _write(tmp / "mouse_ids.h5ad", [g[1] for g in genes])
    man = _run(upper, tmp / "up", tok, med, species="mouse")
    assert man["config"]["gene_name_map_species"] == "mouse"
    _run(proper, tmp / "pr", tok, med, species="mouse")
    _run(by_id, tmp / "id", tok, med, species="mouse")
    got = _tokens(tmp / "up")
    # the same cells named by proper mouse symbols and by ENSMUSG ids give the same tokens
    assert got == _tokens(tmp / "pr") == _tokens(tmp / "id")
    mouse_tokens = {t for g, t in _token_of(tok).items() if g.startswith("ENSMUSG")}
    assert sum(map(len, got)) > 0 and {t for cell in got for t in cell} <= mouse_tokens
    # every column matched (by case, in the mouse table): the report says so, nothing refused
    rep = man["gene_match"][0]
    assert rep["n_matched_genes"] == len(genes) and rep["n_case_insensitive"] == len(genes)


def test_lower_cased_human_symbol_gives_human_gene(dicts, genes):
    tmp, tok, med = dicts
    spec = TokenizerSpec.build(preset="genecompass", token_dictionary=tok, gene_median=med, species="human")
    token_of = _token_of(tok)
    ids = [g[2].lower() for g in genes] + [g[2] for g in genes]
    col, rep = spec.resolve(ids, source="human.h5ad")
    want = [token_of[g[3]] for g in genes]
    assert col.tolist() == want + want and rep.n_matched_genes == 2 * len(genes)


def test_ensembl_ids_are_ids_whatever_the_species(dicts, genes):
    tmp, tok, med = dicts
    spec = TokenizerSpec.build(preset="genecompass", token_dictionary=tok, gene_median=med, species="mouse")
    token_of = _token_of(tok)
    col, _ = spec.resolve([g[3] for g in genes] + [g[1] + ".3" for g in genes], source="mouse.h5ad")
    assert col.tolist() == [token_of[g[3]] for g in genes] + [token_of[g[1]] for g in genes]


def test_species_column_keeps_the_joint_table(dicts, genes):
    tmp, tok, med = dicts
    spec = TokenizerSpec.build(preset="genecompass", token_dictionary=tok, gene_median=med,
                               species_column="organism")
    assert not isinstance(spec.gene_name_map, SpeciesNameMap) and "gene_name_map_species" not in spec.config
    token_of = _token_of(tok)
    col, _ = spec.resolve([g[0] for g in genes] + [g[2] for g in genes], source="both.h5ad")
    assert col.tolist() == [token_of[g[1]] for g in genes] + [token_of[g[3]] for g in genes]


def test_species_name_map_only_replaces_the_joint_table():
    assert species_name_map("ensembl-human", "mouse") is None
    assert species_name_map("ensembl-human+mouse", None) is None
    m = species_name_map("ensembl-human+mouse", "mouse")
    assert m.species == "mouse" and m == ensembl_name_map("mouse")


def test_real_pbmc_declared_human_gets_no_mouse_token(tmp_path, pbmc_path):
    """Real 10x PBMC symbols with a joint dictionary: some match a mouse gene by case in the joint table
    (e.g. "TTC37" -> mouse Ttc37 where V1's human id is another); declared human, none does."""
    from scfm_fast.vocab import load_gene_name_map

    var = list(anndata.read_h5ad(pbmc_path).var_names)
    v1 = load_gene_name_map()
    up = {s.upper() for s in var}
    mouse_ids = [e for s, e in ensembl_name_map("mouse").items() if s.upper() in up]
    tok, med = joint_dictionaries(tmp_path, [v1[s] for s in var if s in v1], mouse_ids)
    mouse_tokens = {t for g, t in _token_of(tok).items() if g.startswith("ENSMUSG")}
    kw = dict(preset="genecompass", token_dictionary=tok, gene_median=med)
    human, rep = TokenizerSpec.build(**kw, species="human").resolve(var, source="pbmc")
    joint, _ = TokenizerSpec.build(**kw, species_column="organism").resolve(var, source="pbmc")
    assert rep.n_matched_genes > 10_000 and not set(human.tolist()) & mouse_tokens
    assert set(joint.tolist()) & mouse_tokens  # the cross-species match the declared species prevents
    assert ((human == joint) | np.isin(joint, list(mouse_tokens))).all()  # nothing else changes


def test_mouse_symbols_in_a_file_declared_human_are_refused(dicts, genes):
    tmp, tok, med = dicts
    path = _write(tmp / "declared_human.h5ad", [g[0] for g in genes])
    with pytest.raises(GeneMatchError, match="--species mouse if these are mouse cells"):
        _run(path, tmp / "dh", tok, med, species="human")
