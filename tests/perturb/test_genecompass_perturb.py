"""GeneCompass in-silico perturbation on real tokens (bundled human PBMC + mouse dentate gyrus cells, one
dataset): the exact engine equals the per-variant reference; ``scfm perturb`` equals a plain oracle built
from NumPy edits of (ids, values) and ``GeneCompassModel.forward_padded`` alone; ``--no-attention-mask``
reproduces unmasked padded forwards; what GeneCompass cannot do is refused clearly."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from scfm_fast._errors import UsageError
from scfm_fast.cli import main
from scfm_fast.model.genecompass_checkpoint import load_genecompass, save_genecompass
from scfm_fast.perturb import perturb_cells, perturb_cells_reference
from scfm_fast.store import open_cells

from .gc_data import N_POS, random_model, tokenize_human_mouse

pytest.importorskip("anndata")
TOL = 1e-5


@pytest.fixture(scope="module")
def gc(tmp_path_factory, pbmc_path):
    tmp = tmp_path_factory.mktemp("gcperturb")
    tokens, tok = tokenize_human_mouse(tmp, pbmc_path, n_human=3, n_mouse=3)
    model = random_model(tok)
    return tokens, tok, model, save_genecompass(model, tmp / "model")


def _table(tokens, rows=None):
    """The dataset's cells (``rows``: some of them) as a token table numbered 0.. (``cell_index`` repeats
    across its two files)."""
    src = open_cells(tokens)
    rows = range(len(src)) if rows is None else rows
    return pa.table({"input_ids": pa.array([c.tolist() for c in src.take(rows)], pa.list_(pa.int64())),
                     "values": pa.array([v.tolist() for v in src.take_values(rows)], pa.list_(pa.float32())),
                     "species": pa.array(src.species[list(rows)].astype(np.int8))})


def _genes(tokens):
    """A group and a single gene present in some cells, and a gene no cell has."""
    src = open_cells(tokens)
    human, mouse = src.take([0])[0], src.take([len(src) - 1])[0]
    return [(int(human[5]), int(human[2])), int(mouse[7]), int(human[9]), 5]


@pytest.mark.parametrize("perturbation", ["delete", "overexpress"])
@pytest.mark.parametrize("which", ["all", "group", "anchor"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_exact_equals_reference(gc, perturbation, which, pooling):
    tokens, tok, model, _ = gc
    genes = _genes(tokens)
    kw = dict(perturbation=perturbation, pooling=pooling, special_token_ids=[0, 1], token_dictionary=tok,
              gene_shifts=True, progress_bar=False, target_embedding=np.random.default_rng(0).normal(size=24),
              genes="all" if which != "group" else genes, anchor=genes[1] if which == "anchor" else None)
    # all genes / pairs: the first human and the last mouse cell (a group: every cell)
    rows = None if which == "group" else [0, len(open_cells(tokens)) - 1]
    cells = _table(tokens, rows)
    exact = perturb_cells(cells, model, batch_tokens=90, **kw)
    ref = perturb_cells_reference(cells, model, **kw)
    key = ["cell_index", "gene_token"]
    assert exact[key].equals(ref[key]) and len(exact) > 0
    np.testing.assert_allclose(exact["cos_sim"], ref["cos_sim"], atol=TOL, rtol=0)
    np.testing.assert_allclose(exact["target_shift"], ref["target_shift"], atol=TOL, rtol=0)
    for a, b, ta, tb in zip(exact["gene_shift_cos"], ref["gene_shift_cos"], exact["gene_shift_tokens"],
                            ref["gene_shift_tokens"]):
        assert list(ta) == list(tb)
        np.testing.assert_allclose(a, b, atol=TOL, rtol=0)
    species = np.asarray(cells.column("species").to_pylist())
    assert set(species[exact["cell_index"].unique()].tolist()) == ({0, 1} if which != "anchor" else {1})
    assert (1 - exact["cos_sim"]).max() > 1e-4  # effects far above the tolerance
    if which == "group":
        skipped = {tuple(r["gene_tokens"]) for r in exact.attrs["skipped"]}
        assert (5,) in skipped  # absent everywhere: skipped, never inserted


def _oracle(model, ids, vals, species, perturbation, *, pooling, pad_to=None, layer=-1):
    """Per gene of the cell: (token, cos_sim) from plain padded forwards of NumPy-edited (ids, values) at
    ``layer`` (-1: GeneCompass's script reads the last layer)."""
    rows = []
    for i in range(len(ids)):
        if perturbation == "delete":
            v_ids, v_vals = np.delete(ids, i), np.delete(vals, i)
        else:  # GeneCompass: value x 1e4, then a stable sort by value, highest first
            raised = vals.astype(np.float64)
            raised[i] *= 10000
            order = sorted(range(len(ids)), key=lambda j: raised[j], reverse=True)
            v_ids, v_vals = ids[order], raised[order].astype(np.float32)
        rows.append((v_ids, v_vals))
    n = pad_to or len(ids)
    batch = np.zeros((len(rows) + 1, n), np.int64), np.zeros((len(rows) + 1, n), np.float32)
    for k, (a, b) in enumerate([(ids, vals), *rows]):
        batch[0][k, :len(a)], batch[1][k, :len(b)] = a, b
    with torch.no_grad():
        h = model.forward_padded(torch.from_numpy(batch[0]), torch.from_numpy(batch[1]),
                                 torch.full((len(batch[0]),), int(species)), layer=layer,
                                 no_attention_mask=pad_to is not None).double().numpy()

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    out = []
    for k, (v_ids, _) in enumerate(rows):
        hv = h[k + 1]
        if pooling == "cls":
            out.append((int(ids[k]), cos(hv[0], h[0, 0])))
            continue
        where = {int(t): j for j, t in enumerate(v_ids)}
        per = [cos(hv[1 + where[int(t)]], h[0, 1 + j]) for j, t in enumerate(ids) if j != k]
        out.append((int(ids[k]), float(np.mean(per))))
    return out


@pytest.mark.parametrize("perturbation,pooling,no_mask,layer", [
    ("delete", "mean", False, None), ("overexpress", "cls", False, None), ("overexpress", "mean", True, None),
    ("delete", "cls", True, None), ("delete", "mean", False, -2)])
def test_cli_equals_plain_oracle(gc, tmp_path, perturbation, pooling, no_mask, layer):
    # no --layer: GeneCompass's own readout, the last layer; an explicit --layer -2 still reads -2
    tokens, tok, _, ckpt = gc
    args = ["perturb", str(tokens), "--model", str(ckpt), "--out", str(tmp_path / "out"), "--perturb", perturbation,
            "--pooling", pooling, "--special-tokens", "0,1", "--token-dictionary", str(tok), "--cells-per-shard",
            "2", "--batch-tokens", "100", "--no-stats"]
    assert main([*args, *(["--no-attention-mask"] if no_mask else []),
                 *(["--layer", str(layer)] if layer is not None else [])]) == 0
    layer = -1 if layer is None else layer
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["config"]["layer"] == layer
    df = pd.read_parquet(tmp_path / "out" / "perturbations.parquet")
    model = load_genecompass(ckpt)  # the checkpoint the CLI read
    src = open_cells(tokens)
    ids_l, vals_l, species = src.take(range(len(src))), src.take_values(range(len(src))), src.species
    assert set(species.tolist()) == {0, 1}
    n = 0
    for c in range(len(src)):
        got = df[(df["cell_index"] == src.cell_index[c]) & (df["file_index"] == src.file_index[c])]
        want = _oracle(model, ids_l[c], vals_l[c], species[c], perturbation, pooling=pooling,
                       pad_to=N_POS if no_mask else None, layer=layer)
        assert got["gene_token"].tolist() == [t for t, _ in want]
        np.testing.assert_allclose(got["cos_sim"], [x for _, x in want], atol=TOL, rtol=0)
        n += len(want)
    assert n == len(df) > 0


def test_no_attention_mask_changes_results_and_exact_equals_reference(gc):
    tokens, tok, model, _ = gc
    kw = dict(perturbation="overexpress", genes=_genes(tokens), special_token_ids=[0, 1], token_dictionary=tok,
              gene_shifts=True, progress_bar=False)
    masked = perturb_cells(tokens, model, **kw)
    exact = perturb_cells(tokens, model, no_attention_mask=True, pad_to=N_POS - 4, batch_tokens=200, **kw)
    ref = perturb_cells_reference(tokens, model, no_attention_mask=True, pad_to=N_POS - 4, **kw)
    np.testing.assert_allclose(exact["cos_sim"], ref["cos_sim"], atol=TOL, rtol=0)
    assert np.abs(exact["cos_sim"] - masked["cos_sim"]).max() > 1e-4  # the pads do attend


def test_default_layer_is_genecompass_last_layer(gc):
    """No layer given: GeneCompass's own readout (the last layer), number for number; state embeddings alike."""
    from scfm_fast.perturb import state_embedding

    tokens, tok, model, _ = gc
    cells = _table(tokens, [0, len(open_cells(tokens)) - 1])
    kw = dict(perturbation="delete", special_token_ids=[0, 1], token_dictionary=tok, progress_bar=False,
              target_embedding=np.random.default_rng(1).normal(size=24))
    default, last, second = (perturb_cells(cells, model, **kw, **extra)
                             for extra in ({}, {"layer": -1}, {"layer": -2}))
    assert default.attrs["layer"] == last.attrs["layer"] == -1 and second.attrs["layer"] == -2
    pd.testing.assert_frame_equal(default, last)
    assert np.abs(default["cos_sim"] - second["cos_sim"]).max() > 1e-4
    ref = perturb_cells_reference(cells, model, **kw)
    np.testing.assert_allclose(ref["cos_sim"], last["cos_sim"], atol=TOL, rtol=0)
    emb = {k: state_embedding(cells, model, special_token_ids=[0, 1], progress_bar=False, **e)[0]
           for k, e in (("default", {}), ("last", {"layer": -1}), ("second", {"layer": -2}))}
    np.testing.assert_array_equal(emb["default"], emb["last"])
    assert np.abs(emb["default"] - emb["second"]).max() > 1e-4


def test_fixture_checkpoint(shared_dir):
    """GeneCompass's own checkpoint layout (768-wide priors, its homolog remap) on its fixture cells."""
    fx = shared_dir / "genecompass_fixture"
    if not fx.is_dir():
        pytest.skip(f"{fx} not found")
    model = load_genecompass(fx / "model")
    z = dict(np.load(fx / "cases" / "mask.npz"))
    mask = z["attention_mask"].astype(bool)
    table = pa.table({"input_ids": pa.array([r[k].tolist() for r, k in zip(z["input_ids"], mask)]),
                      "values": pa.array([r[k].tolist() for r, k in zip(z["values"], mask)], pa.list_(pa.float32())),
                      "species": pa.array(z["species"].ravel().astype(np.int8))})
    for perturbation in ("delete", "overexpress"):
        kw = dict(perturbation=perturbation, special_token_ids=[0, 1], progress_bar=False, layer=-1)
        exact, ref = perturb_cells(table, model, **kw), perturb_cells_reference(table, model, **kw)
        assert len(exact) == int(mask.sum())
        np.testing.assert_allclose(exact["cos_sim"], ref["cos_sim"], atol=TOL, rtol=0)


def test_refusals(gc):
    from .conftest import make_cells, tiny_model

    tokens, tok, model, _ = gc
    kw = dict(special_token_ids=[0, 1], token_dictionary=tok, progress_bar=False)
    with pytest.raises(UsageError, match="delete and overexpress"):
        perturb_cells(tokens, model, perturbation="inhibit", **kw)
    with pytest.raises(UsageError, match="--mode exact"):
        perturb_cells(tokens, model, mode="approx", **kw)
    with pytest.raises(UsageError, match="no per-token values"):
        perturb_cells(make_cells([6]), model, **kw)
    with pytest.raises(UsageError, match="GeneCompass checkpoints only"):
        perturb_cells(make_cells([6]), tiny_model(), no_attention_mask=True, progress_bar=False)


def test_padded_cells_equal_unpadded(gc):
    """Cells padded with (0, 0.0) genes (GeneCompass's own dataset layout) give the unpadded cells' results."""
    tokens, tok, model, _ = gc
    src = open_cells(tokens)
    ids, vals = src.take([0])[0], src.take_values([0])[0]
    padded = pa.table({"input_ids": pa.array([np.concatenate([ids, np.zeros(5, np.int64)]).tolist()]),
                       "values": pa.array([np.concatenate([vals, np.zeros(5, np.float32)]).tolist()],
                                          pa.list_(pa.float32())),
                       "species": pa.array(np.zeros(1, np.int8))})
    kw = dict(perturbation="overexpress", genes=_genes(tokens), special_token_ids=[0, 1], token_dictionary=tok,
              progress_bar=False)
    a, b = perturb_cells(padded, model, **kw), perturb_cells(_table(tokens, [0]), model, **kw)
    assert len(a) == 2 and a["gene_token"].tolist() == b["gene_token"].tolist()
    np.testing.assert_array_equal(a["cos_sim"], b["cos_sim"])
