"""Our perturbation readouts equal Geneformer's, computed on ``transformers`` directly (geneformer_oracle).

Real cells (the bundled PBMC demo, tokenized with the bundled V1 dictionary, each cut to its top 24
genes), a random-init Geneformer-V1-shaped ``BertForMaskedLM`` saved as a checkpoint directory, readout
layer -2 (``hidden_states[-2]``, Geneformer's default ``emb_layer=-1``), fp32.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from . import geneformer_oracle as gf
from .conftest import finish_token_dir

N_CELLS, N_GENES = 4, 24
ATOL = 1e-5
V1_SPECIAL = {0, 1}  # <pad>, <mask> of the V1 dictionary


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """~100 tiny forwards: on a shared 2-core runner, torch's thread pool spins far more than it computes."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cells() -> list[list[int]]:
    from importlib.resources import files

    import anndata as ad

    from scfm_fast import tokenize_anndata

    a = ad.read_h5ad(files("scfm_fast") / "data" / "demo" / "pbmc_200cells.h5ad")
    t = tokenize_anndata(a[:N_CELLS].copy())
    return [ids[:N_GENES] for ids in t.column("input_ids").to_pylist()]


@pytest.fixture(scope="module")
def hf_model():
    return gf.random_v1_model()


@pytest.fixture(scope="module")
def ckpt(hf_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("gf_v1")
    hf_model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def encoder(ckpt):
    from scfm_fast.model.checkpoint import load_encoder

    return load_encoder(str(ckpt), device="cpu")


def _oracle_rows(hf_model, cells, kind, groups, special, **kw):
    """``{(cell, genes): readouts}`` for every group each cell expresses; ``None`` marks a no-op."""
    out = {}
    for ci, ids in enumerate(cells):
        for g in groups if groups is not None else [(t,) for t in ids if t not in special]:
            if not all(t in ids for t in g) and kind != "overexpress":
                continue
            new = gf.perturbed(ids, kind, list(g), special, quartiles=kw.get("quartiles", 1),
                               max_len=kw.get("max_len", 2048))
            out[(ci, tuple(g))] = None if new == ids else gf.readouts(
                hf_model, ids, new, list(g), special, layer=kw.get("layer", -2), states=kw.get("states"))
    return out


def _compare(df: pd.DataFrame, oracle: dict, *, key: str = "genes_cos", gene_shifts: bool = False) -> None:
    got = {(int(c), tuple(int(t) for t in g)): i for i, (c, g) in enumerate(zip(df["cell_index"], df["gene_tokens"]))}
    assert set(got) == {k for k, v in oracle.items() if v is not None}
    noop = {(int(s["cell_index"]), tuple(s["gene_tokens"])) for s in df.attrs["skipped"]
            if s["reason"].startswith("no-op")}
    assert noop == {k for k, v in oracle.items() if v is None}
    for k, i in got.items():
        assert abs(df["cos_sim"].iloc[i] - oracle[k][key]) < ATOL, k
        if gene_shifts:
            want = oracle[k]["gene_cos"]
            toks = [int(t) for t in df["gene_shift_tokens"].iloc[i]]
            assert toks == list(want)
            np.testing.assert_allclose(df["gene_shift_cos"].iloc[i], [want[t] for t in toks], rtol=0, atol=ATOL)


def test_delete_all_cli_equals_transformers(hf_model, ckpt, cells, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from scfm_fast.cli import main

    tok = tmp_path / "tokens"
    tok.mkdir()
    pq.write_table(pa.table({"input_ids": pa.array(cells, pa.list_(pa.int32())),
                             "cell_index": pa.array(np.arange(len(cells)), pa.int64())}), tok / "part-0.parquet")
    finish_token_dir(tok)
    rc = main(["perturb", str(tok), "--model", str(ckpt), "--perturb", "delete", "--genes", "all", "--layer", "-2",
               "--dtype", "float32", "--gene-shifts", "--no-stats", "--out", str(tmp_path / "out")])
    assert rc == 0
    df = pd.read_parquet(tmp_path / "out" / "perturbations.parquet")
    df.attrs["skipped"] = []
    oracle = _oracle_rows(hf_model, cells, "delete", None, V1_SPECIAL)
    assert len(df) == N_CELLS * N_GENES
    _compare(df, oracle, gene_shifts=True)
    # the comparison can fail: effects are visible, and Geneformer's readout is not the pooled cosine
    assert df["shift"].max() > 1e-3
    diff = max(abs(v["genes_cos"] - v["pooled_cos"]) for v in oracle.values())
    assert diff > 5 * ATOL  # (measured: 8e-5 with this seed)
    # Geneformer's emb_layer numbering names the same layer
    rc = main(["perturb", str(tok), "--model", str(ckpt), "--genes", "all", "--emb-layer", "-1", "--no-stats",
               "--out", str(tmp_path / "out2")])
    assert rc == 0
    np.testing.assert_array_equal(pd.read_parquet(tmp_path / "out2" / "perturbations.parquet")["cos_sim"],
                                  df["cos_sim"])


@pytest.mark.parametrize("mode", ["exact", "reference"])
def test_pooled_readout_and_emb_layer_zero(hf_model, encoder, cells, mode):
    from scfm_fast.perturb import perturb_cells, perturb_cells_reference

    run = perturb_cells if mode == "exact" else perturb_cells_reference
    df = run(cells[:2], encoder, perturbation="delete", emb_layer=0, cell_readout="pooled", progress_bar=False)
    _compare(df, _oracle_rows(hf_model, cells[:2], "delete", None, V1_SPECIAL, layer=-1), key="pooled_cos")


@pytest.mark.parametrize("mode", ["exact", "approx", "reference"])
def test_overexpress_genes_and_groups_in_list_order(hf_model, encoder, cells, mode):
    from scfm_fast.perturb import perturb_cells, perturb_cells_reference

    c0 = cells[0]
    absent = [t for t in cells[1] if t not in c0]
    # the top gene (a no-op, skipped), single genes, groups listed against their rank order, and genes
    # the cell lacks (inserted at the front; alone, and in a group with present genes)
    groups = [(c0[0],), (c0[5],), (c0[17],), (c0[9], c0[2]), (c0[20], c0[3], c0[11]), (absent[0],),
              (c0[7], absent[1])]
    kw = dict(perturbation="overexpress", genes=groups, gene_shifts=True, progress_bar=False)
    if mode == "reference":
        df = perturb_cells_reference(cells, encoder, **kw)
    else:
        df = perturb_cells(cells, encoder, mode=mode, approx_check_cells=len(cells), **kw)
    oracle = _oracle_rows(hf_model, cells, "overexpress", groups, V1_SPECIAL)
    if mode == "approx":
        # approximate on a random model (its position embeddings are noise): the same variants, and an
        # error measured against the exact engine on every cell
        exact = perturb_cells(cells, encoder, **kw)
        assert df["gene_tokens"].map(tuple).tolist() == exact["gene_tokens"].map(tuple).tolist()
        err = df.attrs["approx_error"]
        assert err["n_variants"] == len(df)
        assert err["max_abs_dcos"] == pytest.approx(np.abs(df["cos_sim"] - exact["cos_sim"]).max(), abs=1e-9)
        return
    _compare(df, oracle, gene_shifts=True)


@pytest.mark.parametrize(("kind", "quartiles"), [("inhibit", 1), ("activate", 1), ("inhibit", 2), ("activate", 3)])
def test_quartile_moves(hf_model, encoder, cells, kind, quartiles):
    from scfm_fast.perturb import perturb_cells

    c = cells[1]
    groups = [(c[0],), (c[4],), (c[7],), (c[13],), (c[20],), (c[-1],)]
    df = perturb_cells(cells[1:3], encoder, perturbation=kind, genes=groups, rank_shift_quartiles=quartiles,
                       progress_bar=False)
    df["cell_index"] += 1
    df.attrs["skipped"] = [dict(s, cell_index=s["cell_index"] + 1) for s in df.attrs["skipped"]]
    oracle = _oracle_rows(hf_model, cells[1:3], kind, groups, V1_SPECIAL, quartiles=quartiles)
    _compare(df, {(ci + 1, g): v for (ci, g), v in oracle.items()})


def test_cell_state_shifts(hf_model, encoder, cells):
    from scfm_fast.perturb import perturb_cells

    # goal = mean of cells 2-3, alt = cell 1 (each cell the mean of all its gene rows)
    emb = [gf.cell_embedding(hf_model, c, V1_SPECIAL) for c in cells]
    states = np.stack([np.mean(emb[2:], axis=0), emb[1]])
    df = perturb_cells(cells[:1], encoder, perturbation="delete", target_embedding=states,
                       target_names=["shift_goal", "shift_alt"], progress_bar=False)
    oracle = _oracle_rows(hf_model, cells[:1], "delete", None, V1_SPECIAL, states=states)
    _compare(df, oracle)
    for i, (c, g) in enumerate(zip(df["cell_index"], df["gene_tokens"])):
        want = oracle[(int(c), tuple(int(t) for t in g))]["state_shift"]
        np.testing.assert_allclose(df[["shift_goal", "shift_alt"]].iloc[i], want, rtol=0, atol=ATOL)
    assert df["shift_goal"].abs().max() > 1e-4


def test_inserted_genes_cut_the_cell_to_the_model_input(cells):
    """V2 layout at the model's input size: an inserted gene pushes the last genes out, <eos> stays."""
    import tempfile

    from transformers import BertConfig, BertForMaskedLM

    from scfm_fast.model.checkpoint import load_encoder
    from scfm_fast.perturb import perturb_cells

    cls, eos = 25426, 25427
    special = {0, 1, cls, eos}
    cfg = dict(gf.V1_CONFIG, vocab_size=25428, max_position_embeddings=20, initializer_range=0.25)
    hf = BertForMaskedLM(BertConfig(**cfg)).eval()
    v2 = [[cls, *c[:18], eos] for c in cells[:2]]  # exactly 20 tokens
    absent = [t for t in cells[2] if t not in v2[0] and t not in v2[1]]
    groups = [(absent[0],), (absent[1], absent[2]), (v2[0][5], absent[3])]
    states = np.random.default_rng(0).normal(size=(1, 256))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        enc = load_encoder(d, device="cpu")
    for mode in ("exact", "approx"):
        df = perturb_cells(v2, enc, perturbation="overexpress", genes=groups, pooling="mean", gene_shifts=True,
                           special_token_ids=sorted(special), target_embedding=states, mode=mode,
                           approx_check_cells=0, progress_bar=False)
        oracle = _oracle_rows(hf, v2, "overexpress", groups, special, max_len=20, states=states)
        _compare(df, oracle, gene_shifts=True)
        for i, (c, g) in enumerate(zip(df["cell_index"], df["gene_tokens"])):
            want = oracle[(int(c), tuple(int(t) for t in g))]["state_shift"][0]
            assert abs(df["target_shift"].iloc[i] - want) < ATOL
    assert (df["orig_rank"] == -1).sum() == 5  # absent first members had no rank (cell 1 lacks v2[0][5] too)
    skipped = perturb_cells(v2, enc, perturbation="overexpress", genes=groups, pooling="mean", skip_absent=True,
                            special_token_ids=sorted(special), progress_bar=False)
    assert len(skipped) == 0 and len(skipped.attrs["skipped"]) == 6


def test_cls_readout_v2_layout(cells):
    from scfm_fast.model.checkpoint import load_encoder
    from scfm_fast.perturb import perturb_cells

    hf = gf.random_v1_model(1, extra_tokens=2)
    cls, eos = 25426, 25427  # two ids appended to the V1 vocabulary
    special = {0, 1, cls, eos}
    v2 = [[cls, *c[:16], eos] for c in cells[:2]]
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        enc = load_encoder(d, device="cpu")
    for kind, groups in (("delete", None), ("overexpress", [(v2[0][3],), (v2[1][9], v2[1][2])])):
        df = perturb_cells(v2, enc, perturbation=kind, genes="all" if groups is None else groups, pooling="cls",
                           special_token_ids=sorted(special), progress_bar=False)
        oracle = _oracle_rows(hf, v2, kind, groups, special)
        _compare(df, oracle, key="cls_cos")
        assert df["shift"].max() > 1e-4
