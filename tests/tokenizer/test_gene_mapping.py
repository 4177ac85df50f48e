"""Geneformer input compatibility: gene mapping file, var['ensembl_id'], symbol table per dictionary,
keep_counts - each against a NumPy computation of Geneformer's rule."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.sparse as sp

from scfm_fast._errors import UsageError
from scfm_fast.store import read_table
from scfm_fast.tokenizer.counts import ranked_counts
from scfm_fast.tokenizer.pipeline import tokenize_anndata, tokenize_corpus
from scfm_fast.tokenizer.reference import rank_tokenize_ref
from scfm_fast.vocab import GeneVocab, load_gene_name_map
from tests._data import make_counts_adata

ad = pytest.importorskip("anndata")


@pytest.fixture(scope="module")
def vocab():
    return GeneVocab.load()


def _mapped_case(vocab, tmp_path):
    """An input whose ids need the mapping: a retired id and the current id of one gene (summed), a
    lower-case id, an id the mapping lacks (dropped); plus the expected collapsed matrix."""
    a = make_counts_adata(vocab, n_cells=30, n_genes=12, density=0.6)
    ids = list(a.var_names)
    X = np.asarray(a.X.todense())
    retired = "ENSG00000999999"  # not in the vocabulary: reaches gene ids[1] only through the mapping
    assert vocab.tokenizable(retired) < 0
    mapping = {g: g for g in ids}  # Geneformer's file maps current ids to themselves
    mapping[retired] = ids[1]
    new_ids = [retired, *ids[1:]]
    new_ids[2] = ids[2].lower()  # found through the upper-cased lookup
    del mapping[ids[3]]  # unmapped: dropped
    a.var_names = new_ids
    path = tmp_path / "mapping.pkl"
    path.write_bytes(pickle.dumps(mapping))
    # expected: raw counts of column 0 and 1 summed onto ids[1]; column 3 gone; totals over all columns
    keep = [j for j in range(len(ids)) if j not in (0, 3)]
    collapsed = X[:, keep].copy()
    collapsed[:, 0] += X[:, 0]
    genes = [ids[j] for j in keep]
    return a, path, collapsed, genes, X.sum(axis=1, dtype=np.float64)


def _reference(vocab, collapsed, genes, totals, max_len=2048):
    m = sp.csr_matrix(collapsed)
    col = np.array([vocab.tokenizable(g) for g in genes], dtype=np.int32)
    toks, offs, _ = rank_tokenize_ref(m.indptr, m.indices, m.data, col_token=col,
                                      token_median=vocab.token_median, max_len=max_len, totals=totals)
    return [toks[offs[i]:offs[i + 1]].tolist() for i in range(collapsed.shape[0])]


def test_gene_mapping_file_sums_ids_of_one_gene(tmp_path, vocab):
    a, mapping, collapsed, genes, totals = _mapped_case(vocab, tmp_path)
    want = _reference(vocab, collapsed, genes, totals)
    assert want[0] != []
    kept = [i for i, w in enumerate(want) if w]
    got = tokenize_anndata(a, gene_mapping_file=mapping).column("input_ids").to_pylist()
    assert got == [want[i] for i in kept]
    a.write_h5ad(tmp_path / "in.h5ad")
    man = tokenize_corpus(tmp_path / "in.h5ad", tmp_path / "out", gene_mapping_file=mapping, chunk_size=7,
                          progress_bar=False)
    assert read_table(tmp_path / "out").column("input_ids").to_pylist() == [want[i] for i in kept]
    gm = man["gene_match"][0]
    assert gm["n_by_mapping"] == gm["n_matched_genes"] == 11 and gm["n_duplicate_columns"] == 1
    assert a.var_names[3] in gm["unmatched_examples"]
    assert man["config"]["gene_mapping_file"]["sha256"]
    # without the mapping the retired and the lower-case id are lost: the tokens differ
    plain = tokenize_anndata(a, min_gene_match=0.0).column("input_ids").to_pylist()
    assert plain != got


def test_gene_mapping_file_is_the_only_route(tmp_path, vocab):
    a, mapping, *_ = _mapped_case(vocab, tmp_path)
    with pytest.raises(UsageError, match="gene-mapping-file"):
        tokenize_anndata(a, gene_mapping_file=mapping, orthologs="mouse-to-human")


def test_ensembl_id_column_is_the_default_id_source(tmp_path, vocab):
    a = make_counts_adata(vocab, n_cells=20, n_genes=30)
    ids = list(a.var_names)
    want = tokenize_anndata(a).column("input_ids").to_pylist()
    a.var["ensembl_id"] = ids
    a.var_names = [f"sym{j}" for j in range(len(ids))]
    assert tokenize_anndata(a).column("input_ids").to_pylist() == want
    a.write_h5ad(tmp_path / "in.h5ad")
    man = tokenize_corpus(tmp_path / "in.h5ad", tmp_path / "out", progress_bar=False)
    assert read_table(tmp_path / "out").column("input_ids").to_pylist() == want
    assert man["gene_match"][0]["id_source"] == "var['ensembl_id']"


def test_bundled_symbol_table_only_with_the_v1_dictionary(tmp_path, vocab):
    names = load_gene_name_map()
    by_id = {v: k for k, v in names.items() if vocab.tokenizable(v) >= 0}
    a = make_counts_adata(vocab, n_cells=12, n_genes=40)
    n_sym = 0
    new = []
    for j, g in enumerate(a.var_names):  # half of the genes as symbols, the rest as Ensembl ids
        use = j % 2 == 0 and g in by_id
        new.append(by_id[g] if use else g)
        n_sym += use
    a.var_names = new
    a.write_h5ad(tmp_path / "sym.h5ad")
    v1 = tokenize_corpus(tmp_path / "sym.h5ad", tmp_path / "v1", progress_bar=False)
    assert v1["gene_match"][0]["n_by_symbol"] == n_sym > 10
    assert v1["config"]["gene_name_map"] == "auto"
    # a dictionary of other genes (one more here): V1's symbol table is not used
    other = dict(vocab.token_of)
    other["ENSG00000999998"] = max(other.values()) + 1
    (tmp_path / "tok.pkl").write_bytes(pickle.dumps(other))
    kw = {"token_dictionary": tmp_path / "tok.pkl", "gene_median": vocab.gene_median_path, "progress_bar": False}
    off = tokenize_corpus(tmp_path / "sym.h5ad", tmp_path / "off", **kw)
    assert off["gene_match"][0]["n_by_symbol"] == 0
    assert off["gene_match"][0]["n_matched_genes"] == a.n_vars - n_sym
    assert off["config"]["gene_name_map"].startswith("auto (off")
    # ... unless given explicitly
    table = vocab.token_dictionary_path.replace("token_dictionary", "gene_name_id_dict")
    on = tokenize_corpus(tmp_path / "sym.h5ad", tmp_path / "on", gene_name_map=table, **kw)
    assert on["gene_match"][0]["n_by_symbol"] == n_sym
    # V1's genes under other token ids: the symbol table still names the same genes
    swapped = {k: v for k, v in vocab.token_of.items() if k != "ENSG00000999998"}
    a_, b_ = sorted(swapped, key=swapped.get)[2:4]
    swapped[a_], swapped[b_] = swapped[b_], swapped[a_]
    (tmp_path / "swapped.pkl").write_bytes(pickle.dumps(swapped))
    kw["token_dictionary"] = tmp_path / "swapped.pkl"
    assert tokenize_corpus(tmp_path / "sym.h5ad", tmp_path / "sw", **kw)["gene_match"][0]["n_by_symbol"] == n_sym


def test_keep_counts_are_normalised_counts_in_rank_order(tmp_path, vocab):
    a, mapping, collapsed, genes, totals = _mapped_case(vocab, tmp_path)
    tab = tokenize_anndata(a, gene_mapping_file=mapping, keep_counts=True, max_len=5)
    pos = {vocab.tokenizable(g): j for j, g in enumerate(genes)}
    for ids, counts, row in zip(tab.column("input_ids").to_pylist(), tab.column("counts").to_pylist(),
                                tab.column("cell_index").to_pylist()):
        assert len(ids) == len(counts) <= 5
        want = [collapsed[row, pos[t]] / totals[row] * 10_000 for t in ids]
        assert counts == want  # float64, Geneformer's X / n_counts * target_sum
    a.write_h5ad(tmp_path / "in.h5ad")
    tokenize_corpus(tmp_path / "in.h5ad", tmp_path / "o", gene_mapping_file=mapping, keep_counts=True,
                    max_len=5, progress_bar=False)
    on_disk = read_table(tmp_path / "o")
    assert on_disk.column("counts").to_pylist() == tab.column("counts").to_pylist()


def test_ranked_counts_special_tokens_get_zero():
    # two cells; columns 0 and 2 are one gene (token 7); <cls>=1, <eos>=2 around the genes
    indptr, indices = np.array([0, 3, 4]), np.array([0, 1, 2, 1])
    data = np.array([2.0, 5.0, 3.0, 4.0])
    col_token = np.array([7, 9, 7], dtype=np.int32)
    tokens = np.array([1, 9, 7, 2, 1, 9, 2], dtype=np.int32)
    offsets = np.array([0, 4, 7])
    totals = np.array([10.0, 8.0])
    got = ranked_counts(indptr, indices, data, col_token=col_token, tokens=tokens, offsets=offsets, totals=totals)
    np.testing.assert_array_equal(got, [0.0, 5000.0, 5000.0, 0.0, 0.0, 5000.0, 0.0])
