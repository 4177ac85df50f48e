"""Cell/gene embeddings: equal to pooled reference hidden states, batch-invariant, AnnData + CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from scfm_fast.embed import embed_cells, embed_tokens
from scfm_fast.model.bert import BertEncoderModel
from tests._helpers import assert_close_to_baseline, init_like_bert, tiny_config


@pytest.fixture(scope="module")
def model():
    return init_like_bert(BertEncoderModel(tiny_config(layers=2, positions=64))).eval()


def _cells(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, n) for n in lengths]


def _ref_mean(model, cell, layer, specials=(0, 1)):
    with torch.no_grad():
        h = model.forward_reference(torch.as_tensor(cell)[None], torch.ones(1, len(cell)), layer=layer)[0]
    keep = ~np.isin(cell, specials)
    return h[torch.as_tensor(keep)].float().mean(0).numpy()


@pytest.mark.parametrize("layer", [-1, -2])
def test_mean_pooling_equals_reference_and_is_batch_invariant(model, layer):
    cells = _cells(model.config.vocab_size, [5, 1, 64, 17, 33, 2])
    cells[2][[0, 10]] = 1  # <mask> tokens inside a cell are excluded from the mean
    a, _ = embed_tokens(cells, model, layer=layer, batch_tokens=16, progress_bar=False)
    b, _ = embed_tokens(cells[::-1], model, layer=layer, batch_tokens=1000, progress_bar=False)
    np.testing.assert_allclose(a, b[::-1], atol=1e-5)
    for i, c in enumerate(cells):
        np.testing.assert_allclose(a[i], _ref_mean(model, c, layer), atol=1e-4)


def test_cls_pooling_and_empty_cells(model):
    cells = _cells(model.config.vocab_size, [4, 9]) + [np.zeros(0, dtype=np.int64)]
    emb, _ = embed_tokens(cells, model, pooling="cls", progress_bar=False)
    with torch.no_grad():
        h0 = model.forward_reference(torch.as_tensor(cells[1])[None])[0, 0].numpy()
    np.testing.assert_allclose(emb[1], h0, atol=1e-4)
    assert np.isnan(emb[2]).all()


def test_gene_embeddings_are_means_over_occurrences(model):
    cells = [np.array([5, 6, 7]), np.array([7, 5]), np.array([8])]
    _, genes = embed_tokens(cells, model, genes=True, progress_bar=False)
    assert genes["token"].tolist() == [5, 6, 7, 8] and genes["n"].tolist() == [2, 1, 2, 1]
    with torch.no_grad():
        h_a = model.forward_reference(torch.tensor([[5, 6, 7]]))[0]
        h_b = model.forward_reference(torch.tensor([[7, 5]]))[0]
    np.testing.assert_allclose(genes["embedding"][0], ((h_a[0] + h_b[1]) / 2).numpy(), atol=1e-4)


def test_table_source_and_bf16(model):
    cells = _cells(model.config.vocab_size, [7, 12])
    table = pa.table({"input_ids": pa.array(cells, type=pa.list_(pa.int32())), "cell_index": [3, 9]})
    f32, _ = embed_tokens(table, model, progress_bar=False)
    b16, _ = embed_tokens(table, model, dtype="bfloat16", progress_bar=False)
    for i, c in enumerate(cells):
        np.testing.assert_allclose(f32[i], _ref_mean(model, c, -1), atol=1e-4)
    # bf16 error no worse than twice the reference forward's own error in bf16 (both against fp32)
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    base = np.stack([_ref_mean(m16, c, -1) for c in cells]).astype(np.float32)
    assert_close_to_baseline(torch.as_tensor(b16), torch.as_tensor(f32), torch.as_tensor(base))


def test_embed_cells_on_real_pbmc(pbmc_path, tmp_path):
    ad = pytest.importorskip("anndata")
    from scfm_fast.model.config import EncoderConfig
    from scfm_fast.tokenizer.pipeline import TokenizerSpec, tokenize_anndata
    from scfm_fast.vocab import resolve_genes

    adata = ad.read_h5ad(pbmc_path)[:6].copy()
    cfg = EncoderConfig(vocab_size=25_426, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=40, max_position_embeddings=2048)
    m = init_like_bert(BertEncoderModel(cfg)).eval()
    out = embed_cells(adata, m, genes=True, copy=True, tokenize_kwargs={"max_len": 64})
    assert "X_geneformer" not in adata.obsm  # copy=True left the input alone
    # every cell's row equals the reference forward of its own tokens, mean-pooled
    tab = tokenize_anndata(adata, max_len=64)
    cells = [np.asarray(c) for c in tab.column("input_ids").to_pylist()]
    rows = tab.column("cell_index").to_numpy()
    assert out.obsm["X_geneformer"].shape == (6, 32) and sorted(rows.tolist()) == list(range(6))
    sums: dict[int, list] = {}
    for r, c in zip(rows, cells):
        np.testing.assert_allclose(out.obsm["X_geneformer"][r], _ref_mean(m, c, -1), atol=1e-4)
        with torch.no_grad():
            h = m.forward_reference(torch.as_tensor(c)[None])[0].numpy()
        for t, v in zip(c.tolist(), h):
            sums.setdefault(t, []).append(v)
    # varm holds, for each vocabulary gene of the AnnData, the mean of its hidden states over the cells
    spec = TokenizerSpec.build()
    col, _ = resolve_genes(adata.var_names.astype(str).to_numpy(), spec.vocab,
                           gene_name_map=spec.gene_name_map, min_fraction=0.0)
    varm = out.varm["X_geneformer"]
    assert varm.shape == (adata.n_vars, 32)
    seen = [g for g in range(adata.n_vars) if col[g] in sums]
    assert len(seen) == len(sums) and (~np.isnan(varm[:, 0])).sum() == len(seen)
    for g in seen:
        np.testing.assert_allclose(varm[g], np.mean(sums[int(col[g])], axis=0), atol=1e-4)


@pytest.fixture(scope="module")
def pbmc_tokens_ckpt(tmp_path_factory, pbmc_path):
    """The PBMC cells tokenized (with a metadata column) and a small random checkpoint."""
    from scfm_fast.cli import main
    from scfm_fast.model.checkpoint import save_encoder
    from scfm_fast.model.config import EncoderConfig

    d = tmp_path_factory.mktemp("embed_cli")
    cfg = EncoderConfig(vocab_size=25_426, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=40, max_position_embeddings=128)
    torch.manual_seed(0)
    save_encoder(init_like_bert(BertEncoderModel(cfg)), d / "ckpt")
    assert main(["tokenize", str(pbmc_path), "--out", str(d / "tok"), "--max-len", "128",
                 "--obs-columns", "n_genes"]) == 0
    return d / "tok", d / "ckpt"


def _embed(tok, ckpt, out, *extra):
    from scfm_fast.cli import main

    return main(["embed", str(tok), "--model", str(ckpt), "--out", str(out), "--layer", "-2", "--device", "cpu",
                 *extra])


def test_embed_cli(tmp_path, pbmc_tokens_ckpt):
    from scfm_fast.model.checkpoint import load_encoder

    tok, ckpt = pbmc_tokens_ckpt
    assert _embed(tok, ckpt, tmp_path / "e", "--genes", "--plot", "n_genes") == 0
    cells = pq.read_table(tmp_path / "e/cell_embeddings.parquet")
    assert cells.num_rows == 200 and cells.column("cell_index").to_pylist() == list(range(200))
    assert {"n_genes", "length", "file_index"} <= set(cells.column_names)  # metadata travel with embeddings
    emb = np.load(tmp_path / "e/cell_embeddings.npy")
    np.testing.assert_array_equal(emb, np.stack(cells.column("embedding").to_numpy(zero_copy_only=False)))
    api, api_genes = embed_tokens(tok, load_encoder(ckpt), layer=-2, genes=True, progress_bar=False)
    np.testing.assert_allclose(emb, api, rtol=0, atol=1e-6)
    genes = pq.read_table(tmp_path / "e/gene_embeddings.parquet")
    assert genes.num_rows > 1000 and all(g.startswith("ENSG") for g in genes.column("ensembl_id").to_pylist())
    np.testing.assert_array_equal(genes.column("token").to_numpy(), api_genes["token"])
    np.testing.assert_allclose(np.stack(genes.column("embedding").to_numpy(zero_copy_only=False)),
                               api_genes["embedding"], rtol=0, atol=1e-6)
    assert (tmp_path / "e/cell_embeddings_pca.png").read_bytes()[:4] == b"\x89PNG"
    info = json.loads((tmp_path / "e/embed_info.json").read_text())
    assert info["status"] == "complete" and info["n_cells"] == 200


def test_embed_cli_parts_resume_and_refusals(tmp_path, pbmc_tokens_ckpt):
    tok, ckpt = pbmc_tokens_ckpt
    one = tmp_path / "one"
    assert _embed(tok, ckpt, one, "--genes") == 0
    out = tmp_path / "parts"
    assert _embed(tok, ckpt, out, "--genes", "--cells-per-part", "64") == 0
    assert sorted(p.name for p in (out / "parts").glob("*.parquet")) == [f"part-{i:06d}.parquet" for i in range(4)]
    full = pq.read_table(out / "cell_embeddings.parquet")
    # parts give the same cells and genes as one pass (cells in parts are batched differently)
    np.testing.assert_allclose(np.load(out / "cell_embeddings.npy"), np.load(one / "cell_embeddings.npy"),
                               rtol=0, atol=1e-6)
    g1, g4 = (pq.read_table(d / "gene_embeddings.parquet") for d in (one, out))
    assert g1.column("n").to_pylist() == g4.column("n").to_pylist()
    np.testing.assert_allclose(np.stack(g4.column("embedding").to_numpy(zero_copy_only=False)),
                               np.stack(g1.column("embedding").to_numpy(zero_copy_only=False)), rtol=0, atol=1e-6)
    # an interrupted run: part 2 missing, a half-written temporary, no merged files
    (out / "parts/part-000002.parquet").unlink()
    (out / "parts/.part-000002.parquet.tmp").write_bytes(b"partial")
    (out / "cell_embeddings.parquet").unlink()
    t0 = (out / "parts/part-000000.parquet").stat().st_mtime_ns
    assert _embed(tok, ckpt, out, "--genes", "--cells-per-part", "64") == 2  # refuses without --resume
    assert _embed(tok, ckpt, out, "--genes", "--cells-per-part", "64", "--resume") == 0
    assert (out / "parts/part-000000.parquet").stat().st_mtime_ns == t0
    assert pq.read_table(out / "cell_embeddings.parquet").equals(full)
    assert _embed(tok, ckpt, out, "--genes", "--cells-per-part", "64", "--resume", "--layer", "-1") == 2
    assert _embed(tok, ckpt, out, "--cells-per-part", "64", "--overwrite", "--plot", "nope") == 2
    assert _embed(tok, ckpt, out, "--cells-per-part", "100", "--overwrite") == 0
    assert len(list((out / "parts").glob("*.parquet"))) == 2 and not (out / "gene_embeddings.parquet").exists()


def test_triton_kernels_give_the_same_embeddings(model, monkeypatch):
    # the rest of this folder runs plain torch ops (interpreter speed); here the Triton path of the
    # whole embed pipeline (row kernels, attention, segment-mean pooling, gene sums) on a few small cells
    cells = _cells(model.config.vocab_size, [6, 1, 13])
    cells[2][3] = 1  # a <mask> inside a cell: excluded by the pooling kernel too
    plain, plain_genes = embed_tokens(cells, model, genes=True, progress_bar=False)
    monkeypatch.setenv("SCFM_FAST_TRITON", "1")
    import scfm_fast.kernels._utils as kutils

    ran = []
    real = kutils.run_kernel
    monkeypatch.setattr(kutils, "run_kernel", lambda name, *a, **k: ran.append(name) or real(name, *a, **k))
    for mod in ("layer_norm", "bias_act", "embeddings", "pooling"):
        monkeypatch.setattr(f"scfm_fast.kernels.{mod}.run_kernel", kutils.run_kernel)
    fast, fast_genes = embed_tokens(cells, model, genes=True, progress_bar=False)
    assert {"add_layer_norm", "bias_act", "segment_mean"} <= set(ran)
    np.testing.assert_allclose(fast, plain, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(fast_genes["token"], plain_genes["token"])
    np.testing.assert_allclose(fast_genes["embedding"], plain_genes["embedding"], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("extra", "match"), [
    (["--layer", "3"], "--layer"),
    (["--pool", "cls"], "no <cls>"),  # V1 tokens: "cls" would silently pool the top-ranked gene
    (["--batch-tokens", "-1"], "--batch-tokens"),
    (["--cells-per-part", "0"], "--cells-per-part"),
    (["--device", "nonsense"], "--device"),
])
def test_embed_cli_refuses_before_writing(tmp_path, pbmc_tokens_ckpt, capsys, extra, match):
    tok, ckpt = pbmc_tokens_ckpt
    assert _embed(tok, ckpt, tmp_path / "e", *extra) == 2
    assert match in capsys.readouterr().err and not (tmp_path / "e").exists()


def test_embed_cli_checkpoint_and_out_errors(tmp_path, pbmc_tokens_ckpt, capsys):
    import shutil

    tok, ckpt = pbmc_tokens_ckpt
    bad = tmp_path / "no_config"
    shutil.copytree(ckpt, bad)
    (bad / "config.json").unlink()
    assert _embed(tok, bad, tmp_path / "e") == 2
    assert "no config.json" in capsys.readouterr().err and not (tmp_path / "e").exists()
    # the fixed checkpoint then runs in the same --out: a run that wrote nothing is no earlier result
    (tmp_path / "e").mkdir()
    (tmp_path / "e/embed_info.json").write_text(json.dumps({"config": {"model": str(bad)}, "status": "running"}))
    assert _embed(tok, ckpt, tmp_path / "e", "--cells-per-part", "150") == 0
    # --out inside TOKENS_DIR would make its Parquet files part of the token dataset
    shutil.copytree(tok, tmp_path / "tok")
    assert _embed(tmp_path / "tok", ckpt, tmp_path / "tok/emb") == 2
    assert "inside TOKENS_DIR" in capsys.readouterr().err and not (tmp_path / "tok/emb").exists()


def test_tokens_the_model_cannot_read_name_the_cell(model):
    from scfm_fast._errors import InputFileError, UsageError

    vocab = model.config.vocab_size
    cells = [np.array([5, 6]), np.array([7, vocab + 3, 8])]
    with pytest.raises(InputFileError, match=f"cell 1 has token id {vocab + 3}"):
        embed_tokens(cells, model, progress_bar=False)
    with pytest.raises(InputFileError, match="cell 0 has 65 tokens"):
        embed_tokens([np.full(65, 5)], model, progress_bar=False)
    with pytest.raises(UsageError, match="cell 1 starts with gene token 9"):  # specials known: check every cell
        embed_tokens([np.array([2, 5]), np.array([9, 5])], model, pooling="cls", special_token_ids=[0, 1, 2],
                     batch_tokens=2, progress_bar=False)


def test_gene_names_only_from_the_dictionary_the_tokens_used(tmp_path, pbmc_path, pbmc_tokens_ckpt):
    import pickle

    from scfm_fast.cli import main

    _, ckpt = pbmc_tokens_ckpt
    v1 = pbmc_path.parents[1] / "geneformer_v1"
    tokdict = pickle.loads((v1 / "token_dictionary.pkl").read_bytes())
    a, b = sorted(tokdict, key=tokdict.get)[2:4]
    tokdict[a], tokdict[b] = tokdict[b], tokdict[a]  # a custom dictionary: the bundled names would be wrong
    (tmp_path / "dict.pkl").write_bytes(pickle.dumps(tokdict))
    assert main(["tokenize", str(pbmc_path), "--out", str(tmp_path / "tok"), "--max-len", "128",
                 "--token-dictionary", str(tmp_path / "dict.pkl"),
                 "--gene-median", str(v1 / "gene_median_dictionary.pkl")]) == 0
    assert _embed(tmp_path / "tok", ckpt, tmp_path / "e", "--genes") == 0
    genes = pq.read_table(tmp_path / "e/gene_embeddings.parquet")
    assert genes.num_rows > 1000 and set(genes.column("ensembl_id").to_pylist()) == {""}
    # --token-dictionary names them from the right dictionary; another dictionary is refused up front
    assert _embed(tmp_path / "tok", ckpt, tmp_path / "e2", "--genes", "--token-dictionary",
                  str(tmp_path / "dict.pkl")) == 0
    named = pq.read_table(tmp_path / "e2/gene_embeddings.parquet").to_pydict()
    gene_of = {v: k for k, v in tokdict.items()}
    assert named["ensembl_id"] == [gene_of[t] for t in named["token"]]
    assert _embed(tmp_path / "tok", ckpt, tmp_path / "e3", "--genes", "--token-dictionary",
                  str(v1 / "token_dictionary.pkl")) == 2
    assert not (tmp_path / "e3").exists()


def test_resume_refuses_tokens_retokenized_in_place(tmp_path, pbmc_path, pbmc_tokens_ckpt):
    from scfm_fast.cli import main

    _, ckpt = pbmc_tokens_ckpt
    tok = tmp_path / "tok"
    assert main(["tokenize", str(pbmc_path), "--out", str(tok), "--max-len", "64"]) == 0
    assert _embed(tok, ckpt, tmp_path / "e", "--cells-per-part", "100") == 0
    (tmp_path / "e/parts/part-000001.parquet").unlink()
    assert main(["tokenize", str(pbmc_path), "--out", str(tok), "--max-len", "128", "--overwrite"]) == 0
    # same cell count, other tokens: part 0 of the old tokens must not be merged with part 1 of the new
    assert _embed(tok, ckpt, tmp_path / "e", "--cells-per-part", "100", "--resume") == 2


def test_empty_or_unfinished_token_dataset_is_refused(tmp_path, pbmc_path, pbmc_tokens_ckpt, capsys):
    import shutil

    ad = pytest.importorskip("anndata")
    from scfm_fast.cli import main

    tok, ckpt = pbmc_tokens_ckpt
    adata = ad.read_h5ad(pbmc_path)[:3].copy()
    adata.X = adata.X * 0  # every cell is skipped: a dataset of 0 cells (or a tokenize that refused)
    adata.write_h5ad(tmp_path / "zeros.h5ad")
    # issue 13: a run that writes 0 cells is an error, not a complete empty dataset
    assert main(["tokenize", str(tmp_path / "zeros.h5ad"), "--out", str(tmp_path / "tok")]) == 2
    capsys.readouterr()
    assert _embed(tmp_path / "tok", ckpt, tmp_path / "e", "--genes") == 2
    err = capsys.readouterr().err
    assert ("no cells" in err or "unfinished" in err or "not found" in err) and not (tmp_path / "e").exists()
    # an unfinished dataset (a tokenize still running or killed) is refused naming what to do
    shutil.copytree(tok, tmp_path / "half")
    man = tmp_path / "half/__scfm__/manifest.json"
    man.write_text(man.read_text().replace('"complete"', '"in_progress"'))
    assert _embed(tmp_path / "half", ckpt, tmp_path / "e2") == 2
    assert "--resume" in capsys.readouterr().err and not (tmp_path / "e2").exists()
    assert _embed(tmp_path / "missing", ckpt, tmp_path / "e3") == 2
    assert "not a token dataset directory" in capsys.readouterr().err and not (tmp_path / "e3").exists()


def test_embed_cli_checks_the_model_vocabulary_before_the_first_part(tmp_path, pbmc_tokens_ckpt, capsys):
    from scfm_fast.model.checkpoint import save_encoder
    from scfm_fast.model.config import EncoderConfig
    from scfm_fast.store.cells import open_cells

    tok, _ = pbmc_tokens_ckpt
    src = open_cells(tok)
    big = int(src.take_packed(np.arange(len(src)))[0].max())
    pos, _ = src.first_token_outside(big)
    cfg = EncoderConfig(vocab_size=big, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=20, max_position_embeddings=128)
    save_encoder(init_like_bert(BertEncoderModel(cfg)), tmp_path / "small")
    assert _embed(tok, tmp_path / "small", tmp_path / "e") == 2
    err = capsys.readouterr().err
    assert f"cell {src.cell_index[pos]} has token id {big}" in err and "vocabulary of" in err
    assert not (tmp_path / "e").exists()


def test_embed_cli_warns_about_an_unbundled_dictionary(tmp_path, pbmc_tokens_ckpt, capsys):
    import shutil

    tok, ckpt = pbmc_tokens_ckpt
    assert _embed(tok, ckpt, tmp_path / "a", "--cells-per-part", "150") == 0
    assert "does not bundle" not in capsys.readouterr().err
    assert json.loads((tmp_path / "a/embed_info.json").read_text())["token_dictionary"] == "bundled (geneformer-v1)"
    other = tmp_path / "tok"
    shutil.copytree(tok, other)
    man = other / "__scfm__/manifest.json"
    m = json.loads(man.read_text())
    m["config"]["dictionary_hashes"]["token_dictionary"] = "f" * 64
    man.write_text(json.dumps(m))
    assert _embed(other, ckpt, tmp_path / "b", "--cells-per-part", "150") == 0
    assert "does not bundle (sha256 ffffffffffff" in capsys.readouterr().err
    assert json.loads((tmp_path / "b/embed_info.json").read_text())["token_dictionary"].startswith("not bundled")


def test_embed_cli_ranks_split_the_parts(tmp_path, pbmc_tokens_ckpt, monkeypatch):
    # torchrun-style ranks (RANK / WORLD_SIZE): each writes its parts, the last one to finish merges
    tok, ckpt = pbmc_tokens_ckpt
    assert _embed(tok, ckpt, tmp_path / "one", "--cells-per-part", "64", "--genes") == 0
    out = tmp_path / "two"
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert _embed(tok, ckpt, out, "--cells-per-part", "64", "--genes") == 0
        done = sorted(p.name for p in (out / "parts").glob("*.parquet"))
        assert done == (["part-000000.parquet", "part-000002.parquet"] if rank == 0 else
                        [f"part-{i:06d}.parquet" for i in range(4)])
        assert json.loads((out / "embed_info.json").read_text())["status"] == ("running" if rank == 0 else "complete")
    assert pq.read_table(out / "cell_embeddings.parquet").equals(pq.read_table(tmp_path / "one/cell_embeddings.parquet"))
    assert pq.read_table(out / "gene_embeddings.parquet").equals(pq.read_table(tmp_path / "one/gene_embeddings.parquet"))
