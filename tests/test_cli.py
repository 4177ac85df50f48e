"""The ``scfm`` command line: tokenize, medians, info, and error exits."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

from scfm_fast.cli import main
from scfm_fast.store import TokenStore, read_table
from scfm_fast.tokenizer.pipeline import tokenize_anndata


@pytest.fixture(scope="module")
def pbmc(pbmc_path):
    return pbmc_path


def test_tokenize_cli(tmp_path, pbmc, capsys):
    rc = main(["tokenize", str(pbmc), "--out", str(tmp_path / "o"), "--preset", "geneformer-v1",
               "--obs-columns", "n_genes,percent_mito", "--workers", "2", "--chunk-size", "64"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "13,065/16,581 genes matched" in err and "wrote 200 cells" in err
    store = TokenStore(tmp_path / "o")
    assert len(store) == 200 and store.lengths.max() == 2048
    # the command's tokens and carried columns equal the in-memory API on the same cells
    ad = pytest.importorskip("anndata")
    adata = ad.read_h5ad(pbmc)
    want = tokenize_anndata(adata, preset="geneformer-v1")
    tab = read_table(tmp_path / "o")
    assert tab.column("cell_index").to_pylist() == want.column("cell_index").to_pylist()
    assert tab.column("input_ids").to_pylist() == want.column("input_ids").to_pylist()
    rows = tab.column("cell_index").to_numpy()
    np.testing.assert_allclose(tab.column("percent_mito").to_numpy(), adata.obs["percent_mito"].to_numpy()[rows])
    # a second run into the same folder is refused with a hint; --resume on a complete run is a no-op
    assert main(["tokenize", str(pbmc), "--out", str(tmp_path / "o")]) == 2
    assert "--resume" in capsys.readouterr().err
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o").glob("*.parquet")}
    assert main(["tokenize", str(pbmc), "--out", str(tmp_path / "o"), "--preset", "geneformer-v1",
                 "--obs-columns", "n_genes,percent_mito", "--chunk-size", "64", "--resume"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o").glob("*.parquet")} == before
    assert "already complete (200 cells" in capsys.readouterr().err
    assert read_table(tmp_path / "o").column("input_ids").to_pylist() == want.column("input_ids").to_pylist()


def test_tokenize_cli_error_exit(tmp_path, capsys):
    assert main(["tokenize", str(tmp_path / "none.h5ad"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "none.h5ad" in err and "Traceback" not in err


def test_medians_cli_round_trip(tmp_path, pbmc, capsys):
    rc = main(["medians", str(pbmc), "--out", str(tmp_path / "d"), "--chunk-size", "50"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_cells"] == 200 and report["relative_error_bound"] < 0.011
    med = pickle.loads((tmp_path / "d/gene_median_dictionary.pkl").read_bytes())
    tok = pickle.loads((tmp_path / "d/token_dictionary.pkl").read_bytes())
    assert set(med) < set(tok) and tok["<pad>"] == 0 and tok["<mask>"] == 1
    # the new dictionaries drive the tokenizer (a new corpus / species workflow)
    rc = main(["tokenize", str(pbmc), "--out", str(tmp_path / "o"), "--token-dictionary",
               str(tmp_path / "d/token_dictionary.pkl"), "--gene-median", str(tmp_path / "d/gene_median_dictionary.pkl"),
               "--gene-name-map", "none"])
    assert rc == 0
    assert len(TokenStore(tmp_path / "o")) == 200


def test_info_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "scfm_fast.info"], capture_output=True, text=True, check=True).stdout
    for word in ("numba", "torch", "tokenizer backends", "attention backends", "cpp"):
        assert word in out


def test_cli_never_deletes_inputs_and_medians_flags(tmp_path, pbmc, capsys):
    import shutil

    src = tmp_path / "cells.h5ad"
    shutil.copy(pbmc, src)
    # --out at the inputs' own folder: refused with a message, the input stays
    assert main(["tokenize", str(src), "--out", str(tmp_path), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "cells.h5ad" in err and "Traceback" not in err and src.exists()
    assert main(["medians", str(src), "--out", str(tmp_path / "d"), "--bins-per-octave", "0"]) == 2
    assert "--bins-per-octave" in capsys.readouterr().err
    assert main(["medians", str(src), "--out", str(tmp_path / "d"), "--allow-non-integer"]) == 0
