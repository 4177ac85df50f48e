"""Gene-id hints become decisions: the scanpy 10x layout and mouse symbols without orthologs stop a run."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scfm_fast._errors import GeneMatchError
from scfm_fast.cli import main
from scfm_fast.store import read_manifest, read_table
from scfm_fast.tokenizer.pipeline import tokenize_corpus

ad = pytest.importorskip("anndata")


@pytest.fixture(scope="module")
def scanpy_10x(shared_dir, tmp_path_factory):
    """What ``scanpy.read_10x_h5(path).write_h5ad(...)`` gives: symbols in the index, Ensembl in gene_ids."""
    with h5py.File(shared_dir / "data/human/scanpy_10x_v3_chr21_filtered_feature_bc_matrix.h5") as f:
        m = f["matrix"]
        n_genes, n_cells = (int(x) for x in m["shape"][:])
        X = sp.csr_matrix((m["data"][:].astype(np.float32), m["indices"][:], m["indptr"][:]),
                          shape=(n_cells, n_genes))
        dec = {k: [x.decode() for x in m[f"features/{k}"][:]] for k in ("name", "id", "feature_type", "genome")}
        cells = [x.decode() for x in m["barcodes"][:]]
    var = pd.DataFrame({"gene_ids": dec["id"], "feature_types": dec["feature_type"], "genome": dec["genome"]},
                       index=pd.Index(dec["name"]))
    a = ad.AnnData(X, obs=pd.DataFrame(index=cells), var=var)
    a.var_names_make_unique()
    path = tmp_path_factory.mktemp("10x") / "pbmc_10x.h5ad"
    a.write_h5ad(path)
    return path


def test_scanpy_10x_layout_stops_with_the_flag_to_pass(tmp_path, scanpy_10x, capsys):
    with pytest.raises(GeneMatchError, match=r"var column 'gene_ids' matches 240 of 507 genes \(47\.3%\).* "
                                             r"only 209 \(41\.2%\); pass --gene-id-column gene_ids"):
        tokenize_corpus(scanpy_10x, tmp_path / "o", progress_bar=False)
    assert not (tmp_path / "o" / "__scfm__" / "manifest.json").exists()
    assert main(["tokenize", str(scanpy_10x), "--out", str(tmp_path / "o")]) == 2
    assert "--gene-id-column gene_ids" in capsys.readouterr().err
    # the flag it names gives the Ensembl match; an explicit choice of the index is respected
    man = tokenize_corpus(scanpy_10x, tmp_path / "ids", gene_id_column="gene_ids", progress_bar=False)
    assert man["gene_match"][0]["n_matched_genes"] == 240
    assert man["summary"]["fraction_counts_matched"] > 0.97
    man = tokenize_corpus(scanpy_10x, tmp_path / "sym", gene_id_column="index", progress_bar=False)
    assert man["gene_match"][0]["n_matched_genes"] == 209
    assert read_table(tmp_path / "ids").num_rows == man["n_cells"]


@pytest.fixture(scope="module")
def mouse(shared_dir):
    return shared_dir / "data/mouse/scvelo_pancreas_100obs.h5ad"


def test_mouse_symbols_without_orthologs_stop(tmp_path, mouse, capsys):
    with pytest.raises(GeneMatchError, match=r"only when case is ignored \(e\.g\. '[A-Z][a-z0-9]+.*'\).*"
                                             r"--orthologs mouse-to-human.*--allow-case-insensitive"):
        tokenize_corpus(mouse, tmp_path / "o", progress_bar=False)
    assert main(["tokenize", str(mouse), "--out", str(tmp_path / "o")]) == 2
    assert "--allow-case-insensitive" in capsys.readouterr().err
    # explicitly allowed: tokenized, and the manifest keeps the number of case-insensitive matches
    man = tokenize_corpus(mouse, tmp_path / "ci", allow_case_insensitive=True, progress_bar=False)
    gm = read_manifest(tmp_path / "ci")["gene_match"][0]
    assert gm["n_case_insensitive"] > gm["n_matched_genes"] / 2 and man["config"]["allow_case_insensitive"]
    # with orthologs nothing matches by case
    tokenize_corpus(mouse, tmp_path / "orth", orthologs="mouse-to-human", progress_bar=False)
    assert read_manifest(tmp_path / "orth")["gene_match"][0]["n_case_insensitive"] == 0
