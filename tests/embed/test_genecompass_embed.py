"""GeneCompass through embed_tokens / ``scfm embed``: embeddings equal GeneCompass's own outputs (fixture) and a
padded reference forward of the same real cells (human and mouse in one run); the families refuse each
other's tokens; ``--no-attention-mask`` reproduces GeneCompass's unmasked scripts."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch

from scfm_fast._errors import InputFileError, UsageError
from scfm_fast.cli import main
from scfm_fast.embed.cells import embed_tokens
from scfm_fast.model.genecompass_checkpoint import load_genecompass, save_genecompass
from scfm_fast.store import open_cells
from tests._genecompass import fixture_path, human_mouse_inputs, joint_dictionaries

anndata = pytest.importorskip("anndata")
MAX_LEN = 64


@pytest.fixture(scope="module")
def fixture_dir(shared_dir):
    return fixture_path(shared_dir)


def _case_table(fixture_dir, name="mask"):
    """A fixture case's cells, unpadded, as a token table; plus the case arrays and its mask."""
    z = dict(np.load(fixture_dir / "cases" / f"{name}.npz"))
    mask = z["attention_mask"].astype(bool)
    table = pa.table({
        "input_ids": pa.array([r[k].tolist() for r, k in zip(z["input_ids"], mask)], pa.list_(pa.int64())),
        "values": pa.array([r[k].tolist() for r, k in zip(z["values"], mask)], pa.list_(pa.float32())),
        "species": pa.array(z["species"].ravel().astype(np.int8))})
    return table, z, mask


def test_fixture_cls_mean_and_genes_equal_genecompass(fixture_dir):
    model = load_genecompass(fixture_dir / "model")
    table, z, mask = _case_table(fixture_dir)
    out = z["last_hidden_state"]  # GeneCompass's own forward, row 0 = species row
    cls, _ = embed_tokens(table, model, pooling="cls", progress_bar=False)
    np.testing.assert_allclose(cls, out[:, 0], atol=1e-5, rtol=0)
    mean, genes = embed_tokens(table, model, pooling="mean", genes=True, batch_tokens=20, progress_bar=False)
    np.testing.assert_allclose(mean, np.stack([out[i, 1:][mask[i]].mean(0) for i in range(len(mask))]),
                               atol=1e-5, rtol=0)
    ids, rows = z["input_ids"][mask], out[:, 1:][mask]
    assert genes["token"].tolist() == sorted(set(ids.tolist()))
    for t, n, e in zip(genes["token"], genes["n"], genes["embedding"]):
        assert n == (ids == t).sum()
        np.testing.assert_allclose(e, rows[ids == t].mean(0), atol=1e-5, rtol=0)
    # layer 1 of 2 = GeneCompass's hidden_states[1]
    first, _ = embed_tokens(table, model, pooling="cls", layer=1, progress_bar=False)
    np.testing.assert_allclose(first, z["hidden_states"][1][:, 0], atol=1e-5, rtol=0)


def test_no_attention_mask_reproduces_genecompass_unmasked(fixture_dir):
    model = load_genecompass(fixture_dir / "model")
    table, _, mask = _case_table(fixture_dir)
    nomask = np.load(fixture_dir / "cases" / "nomask.npz")  # the same cells, padded to 16, run without a mask
    got, _ = embed_tokens(table, model, pooling="cls", no_attention_mask=True, pad_to=16, progress_bar=False)
    np.testing.assert_allclose(got, nomask["last_hidden_state"][:, 0], atol=1e-5, rtol=0)
    masked, _ = embed_tokens(table, model, pooling="cls", progress_bar=False)
    assert np.abs(got - masked).max() > 1e-3  # the pads do change the result: the option is not a no-op
    # default pad_to = the model's positions: equals a padded forward without mask at that length
    ids = torch.zeros(len(mask), model.config.max_position_embeddings, dtype=torch.long)
    vals = torch.zeros(ids.shape)
    for i, (c, v) in enumerate(zip(table.column("input_ids").to_pylist(), table.column("values").to_pylist())):
        ids[i, :len(c)], vals[i, :len(v)] = torch.tensor(c), torch.tensor(v)
    sp = torch.from_numpy(table.column("species").to_numpy().astype(np.int64))
    with torch.inference_mode():
        ref = model.forward_padded(ids, vals, sp, no_attention_mask=True)
    got, _ = embed_tokens(table, model, pooling="mean", no_attention_mask=True, progress_bar=False)
    ref_mean = np.stack([ref[i, 1:1 + int(m.sum())].mean(0).numpy() for i, m in enumerate(mask)])
    np.testing.assert_allclose(got, ref_mean, atol=1e-4, rtol=0)
    with pytest.raises(UsageError, match="pad_to"):
        embed_tokens(table, model, pad_to=16, progress_bar=False)
    with pytest.raises(UsageError, match="more than pad_to"):
        embed_tokens(table, model, no_attention_mask=True, pad_to=4, progress_bar=False)


@pytest.fixture(scope="module")
def real(tmp_path_factory, pbmc_path):
    """The bundled PBMC cells and synthetic mouse cells, tokenized with --preset genecompass, and a small random
    GeneCompass model over that joint dictionary (mouse genes remapped to human ones for the priors)."""
    from scfm_fast.model.config import EncoderConfig
    from scfm_fast.model.genecompass import GeneCompassConfig, GeneCompassModel
    from scfm_fast.tokenizer.pipeline import tokenize_corpus

    tmp = tmp_path_factory.mktemp("gcembed")
    hp, mp, human_ids, mouse_ids = human_mouse_inputs(tmp, pbmc_path, n_mouse=30)
    tok, med = joint_dictionaries(tmp, human_ids, mouse_ids)
    out = tmp / "tokens"
    tokenize_corpus([hp, mp], out, preset="genecompass", token_dictionary=tok, gene_median=med,
                    species_column="organism", max_len=MAX_LEN, progress_bar=False)
    with open(tok, "rb") as f:
        vocab = len(pickle.load(f))
    torch.manual_seed(0)
    enc = EncoderConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, hidden_act="gelu", max_position_embeddings=MAX_LEN)
    model = GeneCompassModel(GeneCompassConfig(encoder=enc, knowledge_dim=8)).eval()
    e = model.bert.embeddings
    for k in model.gcfg.knowledge:
        getattr(e, f"{k}_knowledge").normal_()
    n_h = len(set(human_ids))
    e.homologous_index[2 + n_h:] = 2 + torch.arange(vocab - 2 - n_h) % n_h  # mouse -> some human gene
    return out, tok, model, tmp


def test_real_cells_equal_padded_reference(real):
    out, _, model, _ = real
    src = open_cells(out)
    species = src.species
    assert set(np.unique(species).tolist()) == {0, 1}  # human and mouse in one run
    ids_l, vals_l = src.take(range(len(src))), src.take_values(range(len(src)))
    n = max(len(c) for c in ids_l)
    ids, vals = torch.zeros(len(src), n, dtype=torch.long), torch.zeros(len(src), n)
    for i, (c, v) in enumerate(zip(ids_l, vals_l)):
        ids[i, :len(c)], vals[i, :len(v)] = torch.from_numpy(c), torch.from_numpy(v)
    mask = ids != 0
    with torch.inference_mode():
        ref = model.forward_padded(ids, vals, torch.from_numpy(species.astype(np.int64)), mask)
    cls, _ = embed_tokens(out, model, pooling="cls", batch_tokens=500, progress_bar=False)
    np.testing.assert_allclose(cls, ref[:, 0].numpy(), atol=1e-4, rtol=0)
    mean, _ = embed_tokens(out, model, pooling="mean", batch_tokens=500, progress_bar=False)
    ref_mean = ((ref[:, 1:] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).numpy()
    np.testing.assert_allclose(mean, ref_mean, atol=1e-4, rtol=0)
    # species is read from the dataset: all-human would change the mouse cells
    flipped = pa.table({"input_ids": pa.array([c.tolist() for c in ids_l]),
                        "values": pa.array([v.tolist() for v in vals_l], pa.list_(pa.float32())),
                        "species": pa.array(np.zeros(len(src), np.int8))})
    alt, _ = embed_tokens(flipped, model, pooling="cls", progress_bar=False)
    mouse = species == 1
    np.testing.assert_allclose(alt[~mouse], cls[~mouse], atol=1e-5, rtol=0)
    assert np.abs(alt[mouse] - cls[mouse]).max() > 1e-3


def test_families_refuse_each_others_tokens(real, tmp_path):
    from scfm_fast.model.bert import BertEncoderModel
    from scfm_fast.model.config import EncoderConfig

    out, _, model, _ = real
    with pytest.raises(UsageError, match="no per-token values.*--preset genecompass"):
        embed_tokens([np.array([2, 3, 4])], model, progress_bar=False)
    bert = BertEncoderModel(EncoderConfig(vocab_size=model.config.vocab_size, hidden_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=32,
                                          max_position_embeddings=MAX_LEN)).eval()
    with pytest.raises(UsageError, match="GeneCompass tokens.*Geneformer"):
        embed_tokens(out, bert, progress_bar=False)
    with pytest.raises(UsageError, match="GeneCompass checkpoints only"):
        embed_tokens([np.array([2, 3, 4])], bert, no_attention_mask=True, progress_bar=False)
    bad = pa.table({"input_ids": pa.array([[2, 3]]), "values": pa.array([[1.0, 2.0]], pa.list_(pa.float32())),
                    "species": pa.array(np.array([2], np.int8))})
    with pytest.raises(InputFileError, match="cell 0 has species 2"):
        embed_tokens(bad, model, progress_bar=False)


def test_cli_embeds_genecompass_and_checks_dictionary(real, tmp_path, capsys):
    out, tok, model, _ = real
    ckpt = save_genecompass(model, tmp_path / "gc")
    res = tmp_path / "emb"
    assert main(["embed", str(out), "--model", str(ckpt), "--out", str(res), "--pool", "cls", "--device", "cpu",
                 "--token-dictionary", str(tok), "--genes"]) == 0
    want, _ = embed_tokens(out, model, pooling="cls", progress_bar=False)
    np.testing.assert_allclose(np.load(res / "cell_embeddings.npy"), want, atol=1e-5, rtol=0)
    genes = pa.parquet.read_table(res / "gene_embeddings.parquet")
    assert all(g.startswith(("ENSG", "ENSMUSG")) for g in genes.column("ensembl_id").to_pylist())
    nm = tmp_path / "nomask"
    assert main(["embed", str(out), "--model", str(ckpt), "--out", str(nm), "--device", "cpu",
                 "--no-attention-mask"]) == 0
    want, _ = embed_tokens(out, model, no_attention_mask=True, progress_bar=False)
    np.testing.assert_allclose(np.load(nm / "cell_embeddings.npy"), want, atol=1e-5, rtol=0)
    # the dataset's own dictionary, but a checkpoint with a larger vocabulary: refused with both sizes
    from scfm_fast.model.config import EncoderConfig
    from scfm_fast.model.genecompass import GeneCompassConfig, GeneCompassModel

    v = model.config.vocab_size
    enc = EncoderConfig(vocab_size=v + 5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, hidden_act="gelu", max_position_embeddings=MAX_LEN)
    big = save_genecompass(GeneCompassModel(GeneCompassConfig(encoder=enc, knowledge_dim=8)), tmp_path / "big")
    capsys.readouterr()
    assert main(["embed", str(out), "--model", str(big), "--out", str(tmp_path / "x"), "--device", "cpu",
                 "--token-dictionary", str(tok)]) != 0
    assert f"has {v} entries but the checkpoint's vocabulary has {v + 5} word-embedding rows" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_embed_cells_anndata_equals_cli(real, tmp_path):
    """The AnnData API with a GeneCompass model: tokenized with --preset genecompass on the fly, values and
    species passed on; equal to ``scfm embed`` on the token dataset made from the same files."""
    from scfm_fast.embed import embed_cells

    out, tok, model, tmp = real
    ckpt = save_genecompass(model, tmp_path / "gc")
    res = tmp_path / "emb"
    assert main(["embed", str(out), "--model", str(ckpt), "--out", str(res), "--pool", "cls",
                 "--device", "cpu"]) == 0
    cli = np.load(res / "cell_embeddings.npy")
    src = open_cells(out)
    file_index, cell_index = (src.columns(["file_index", "cell_index"]).column(c).to_numpy()
                              for c in ("file_index", "cell_index"))
    kw = {"token_dictionary": tok, "gene_median": tmp / "gc_medians.pkl", "max_len": MAX_LEN}
    for f, (name, species) in enumerate((("human", {"species": "human"}), ("mouse", {"species_column": "organism"}))):
        adata = anndata.read_h5ad(tmp / f"{name}.h5ad")
        got = embed_cells(adata, model, pooling="cls", copy=True, tokenize_kwargs={**kw, **species})
        emb = got.obsm["X_genecompass"]
        rows = file_index == f
        np.testing.assert_allclose(emb[cell_index[rows]], cli[rows], atol=1e-5, rtol=0)
        assert np.isnan(emb).any(axis=1).sum() == adata.n_obs - rows.sum()  # cells without tokens: NaN
        assert got.uns["X_genecompass"]["preset"] == "genecompass"
    # mouse cells read as human differ (species reaches the model), and a wrong dictionary size is refused
    as_human = embed_cells(adata, model, pooling="cls", copy=True, tokenize_kwargs={**kw, "species": "human"})
    assert np.nanmax(np.abs(as_human.obsm["X_genecompass"] - emb)) > 1e-3
    with open(tok, "rb") as fh:
        d = pickle.load(fh)
    small = tmp_path / "small.pkl"
    with open(small, "wb") as fh:
        pickle.dump(dict(list(d.items())[:-3]), fh)
    with pytest.raises(InputFileError, match="entries but the checkpoint's vocabulary"):
        embed_cells(adata, model, tokenize_kwargs={**kw, "token_dictionary": small, "species": "mouse"})
    with pytest.raises(UsageError, match="no per-token values"):
        embed_cells(adata, model, tokenize_kwargs={"preset": "geneformer-v1", "orthologs": "mouse-to-human"})
