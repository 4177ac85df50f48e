"""The batched exact engine equals the one-forward-per-variant reference (fp32 tolerance)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from scfm_fast._errors import UsageError
from scfm_fast.perturb import perturb_cells, perturb_cells_reference
from scfm_fast.perturb.exact import embedding_index

from .conftest import SPECIAL, make_cells, tiny_model

COS_ATOL = 1e-6


def _both(cells, model, **kw):
    kw.setdefault("special_token_ids", SPECIAL)
    ex = perturb_cells(cells, model, **kw)
    ref_kw = {k: v for k, v in kw.items() if k not in ("batch_tokens", "mode", "dtype")}
    ref = perturb_cells_reference(cells, model, **ref_kw)
    return ex, ref


def _assert_same(ex: pd.DataFrame, ref: pd.DataFrame, *, atol: float = COS_ATOL) -> None:
    assert len(ex) == len(ref) > 0
    for col in ("cell_index", "gene_token", "n_genes", "orig_rank", "new_rank"):
        np.testing.assert_array_equal(ex[col].to_numpy(), ref[col].to_numpy(), err_msg=col)
    assert ex["gene_tokens"].map(list).tolist() == ref["gene_tokens"].map(list).tolist()
    np.testing.assert_allclose(ex["cos_sim"], ref["cos_sim"], rtol=0, atol=atol)
    np.testing.assert_allclose(ex["shift"], 1 - ex["cos_sim"], rtol=0, atol=0)
    states = [c for c in ref.columns if c == "target_shift" or c.startswith("shift_")]
    assert states == [c for c in ex.columns if c == "target_shift" or c.startswith("shift_")]
    for c in states:
        np.testing.assert_allclose(ex[c], ref[c], rtol=0, atol=atol, err_msg=c)
    if "gene_shift_cos" in ref:
        for a, b, ta, tb in zip(ex["gene_shift_cos"], ref["gene_shift_cos"], ex["gene_shift_tokens"],
                                ref["gene_shift_tokens"]):
            np.testing.assert_array_equal(ta, tb)
            np.testing.assert_allclose(a, b, rtol=0, atol=atol)
    assert ex.attrs["skipped"] == ref.attrs["skipped"]


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("perturbation", ["delete", "overexpress", "inhibit", "activate"])
def test_all_genes_every_perturbation(model, perturbation, v2):
    # lengths: 1 gene, prime, and a cell longer than the 96-token batch budget (several batches)
    cells = make_cells([1, 7, 13, 41], v2=v2)
    ex, ref = _both(cells, model, perturbation=perturbation, batch_tokens=96, gene_shifts=True,
                    target_embedding=np.linspace(-1, 1, 48))
    _assert_same(ex, ref)
    assert ex["shift"].max() > 1e-4  # the perturbations do move the embeddings


@pytest.mark.parametrize("layer", [0, 1, -1])
def test_readout_layers(model, layer):
    cells = make_cells([9, 20])
    _assert_same(*_both(cells, model, perturbation="delete", layer=layer))


def test_default_layer_is_geneformer_second_to_last(model):
    # no layer given: Geneformer's own readout (hidden_states[-2], its emb_layer=-1), number for number
    cells = make_cells([9, 20])
    kw = dict(perturbation="delete", special_token_ids=SPECIAL, progress_bar=False)
    default, second, last = (perturb_cells(cells, model, **kw, **e) for e in ({}, {"layer": -2}, {"layer": -1}))
    assert default.attrs["layer"] == second.attrs["layer"] == -2
    pd.testing.assert_frame_equal(default, second)
    assert np.abs(default["cos_sim"] - last["cos_sim"]).max() > 1e-4
    with pytest.raises(UsageError, match="give either --layer"):
        perturb_cells(cells, model, layer=-2, emb_layer=-1, **kw)


def test_layer_zero_delete_has_exact_shift_of_embedding_table(model):
    # layer 0 = embedding output: checks the shared (shifted-position) embedding tables on their own
    cells = make_cells([6])
    ex, ref = _both(cells, model, perturbation="overexpress", layer=0, gene_shifts=True)
    _assert_same(ex, ref)


@pytest.mark.parametrize("budget", [1, 30, 10_000], ids=["one-token", "mid", "whole-cell"])
def test_batch_budget_does_not_change_results(model, budget):
    cells = make_cells([12, 25], v2=True)
    ex = perturb_cells(cells, model, special_token_ids=SPECIAL, batch_tokens=budget)
    ref = perturb_cells(cells, model, special_token_ids=SPECIAL, batch_tokens=10**6)
    np.testing.assert_allclose(ex["cos_sim"], ref["cos_sim"], rtol=0, atol=1e-6)


def test_gene_lists_pairs_and_absent_genes(model):
    cells = make_cells([10, 15, 20], v2=True, seed=3)
    present = [int(t) for t in cells[1][1:4]]
    absent = int(next(t for t in range(4, 200) if all(t not in c for c in cells)))
    genes = [present[0], (present[1], present[2]), absent, int(cells[0][2])]
    for perturbation in ("delete", "overexpress", "activate"):
        ex, ref = _both(cells, model, perturbation=perturbation, genes=genes, gene_shifts=True, skip_absent=True)
        _assert_same(ex, ref)
        assert (ex["gene_token"] == -1).sum() == 1  # the pair
        reasons = {tuple(s["gene_tokens"]): s["reason"] for s in ex.attrs["skipped"]}
        assert (absent,) in reasons
        assert int(ex["cell_index"].nunique()) <= 3


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("cell_readout", ["genes", "pooled"])
def test_overexpress_inserts_absent_genes(model, v2, cell_readout):
    # a cell at the model's 64 positions (the insertion cuts its last genes) and shorter ones
    cells = make_cells([62 if v2 else 64, 10, 5], v2=v2, seed=4)
    absent = [t for t in range(4, 200) if all(t not in c for c in cells)][:3]
    present = int(cells[1][3 if v2 else 2])
    genes = [absent[0], (absent[1], absent[2]), (present, absent[0]), present]
    ex, ref = _both(cells, model, perturbation="overexpress", genes=genes, gene_shifts=True, pooling="mean",
                    cell_readout=cell_readout, target_embedding=np.linspace(-1, 1, 48), batch_tokens=80)
    _assert_same(ex, ref)
    assert len(ex) == 4 * 3 and not ex.attrs["skipped"]  # every group in every cell (absent -> inserted)
    first = ex[ex["cell_index"] == 0]
    # the full cell keeps its length: as many of its last genes cut as were inserted (never <eos>), so
    # (moved members + inserted-and-cut) = len(group) of its genes leave the comparison
    n_full = len(cells[0]) - (2 if v2 else 0)
    assert (first["gene_shift_tokens"].map(len) == n_full - first["gene_tokens"].map(len)).all()
    cut = set(int(t) for t in cells[0][-(3 if v2 else 2):][:2])  # its last two genes
    two = first["gene_tokens"].map(lambda g: [int(t) for t in g] == absent[1:3])
    (kept,) = first["gene_shift_tokens"][two]
    assert cut.isdisjoint(int(t) for t in kept)
    for mode in ("approx",):  # inserted genes have no cached K/V: those variants run exactly
        ap = perturb_cells(cells, model, perturbation="overexpress", genes=genes, special_token_ids=SPECIAL,
                           pooling="mean", cell_readout=cell_readout, mode=mode, approx_check_cells=0)
        ins = ap["gene_tokens"].map(lambda g: any(int(t) in absent for t in g)).to_numpy()
        np.testing.assert_allclose(ap["cos_sim"][ins], ex["cos_sim"][ins], rtol=0, atol=1e-5)


def test_anchor_pairs_and_combined_list(model):
    cells = make_cells([8, 11])
    anchor = int(cells[1][4])
    ex, ref = _both(cells, model, perturbation="delete", anchor=anchor)
    _assert_same(ex, ref)
    assert set(ex["cell_index"]) == {1} and len(ex) == 10
    assert (ex["gene_token"] != anchor).all()
    assert ex.attrs["skipped"][0]["cell_index"] == 0
    both = [int(cells[1][0]), int(cells[1][5])]
    ex, ref = _both(cells, model, perturbation="overexpress", genes=both, combine=True)
    _assert_same(ex, ref)
    # cell 1 expresses both; cell 0 gets them inserted (orig_rank -1 unless it has the first one)
    assert len(ex) == 2 and all(g == both for g in ex["gene_tokens"])
    ex = perturb_cells(cells, model, perturbation="overexpress", genes=both, combine=True, skip_absent=True,
                       special_token_ids=SPECIAL)
    assert ex["cell_index"].tolist() == [1]


@pytest.mark.parametrize("perturbation", ["delete", "overexpress", "inhibit"])
@pytest.mark.parametrize("layer", [1, -2, -1])
@pytest.mark.parametrize("gene_shifts", [False, True])
def test_cls_pooling_v2(model, perturbation, layer, gene_shifts):
    # without gene shifts the last layer runs for the <cls> row only (layer 1: from the shared Q/K/V)
    cells = make_cells([9, 14], v2=True)
    _assert_same(*_both(cells, model, perturbation=perturbation, pooling="cls", rank_shift=0.5, layer=layer,
                        gene_shifts=gene_shifts, batch_tokens=40))


def test_embedding_tables_are_shared():
    # delete-all of a 50-token cell: two tables (offset 0 prefix, offset -1 suffix), no extra rows
    src = np.stack([np.delete(np.arange(50), p) for p in range(50)])
    flat, offs, xs, _ = embedding_index(src, 50)
    assert offs.tolist() == [-1, 0] and len(xs) == 0 and flat.max() < 100
    # overexpress-all: moved genes use unique extra rows, the rest two tables
    src = np.stack([np.r_[p, np.delete(np.arange(50), p)] for p in range(50)])
    flat, offs, xs, _ = embedding_index(src, 50)
    assert offs.tolist() == [0, 1] and len(xs) == 49


def test_token_sources_agree(model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cells = make_cells([6, 9])
    t = pa.table({"input_ids": pa.array([c.tolist() for c in cells], pa.list_(pa.int32())),
                  "length": pa.array([len(c) for c in cells], pa.int32()),
                  "cell_index": pa.array([100, 101], pa.int64())})
    pq.write_table(t, tmp_path / "part-0.parquet")
    a = perturb_cells(cells, model, special_token_ids=SPECIAL)
    b = perturb_cells(tmp_path / "part-0.parquet", model, special_token_ids=SPECIAL)
    c = perturb_cells(t, model, special_token_ids=SPECIAL)
    np.testing.assert_array_equal(a["cos_sim"], b["cos_sim"])
    np.testing.assert_array_equal(b["cos_sim"], c["cos_sim"])
    assert b["cell_index"].unique().tolist() == [100, 101]
    assert a["cell_index"].unique().tolist() == [0, 1]


def test_ensembl_ids_from_the_bundled_dictionary(model):
    df = perturb_cells(make_cells([5]), model, special_token_ids=SPECIAL)
    assert df["ensembl_id"].str.startswith("ENSG").all()
    assert list(df.columns[:11]) == ["cell_index", "perturbation", "gene_token", "gene_tokens", "ensembl_id",
                                     "gene_name", "n_genes", "orig_rank", "new_rank", "cos_sim", "shift"]
    from scfm_fast.vocab.targets import TargetResolver

    sym = TargetResolver().symbol_of()
    assert df["gene_name"].tolist() == [sym.get(int(t), e) for t, e in zip(df["gene_token"], df["ensembl_id"])]


def test_symbol_targets_resolve(model):
    # the bundled Geneformer V1 dictionaries map a symbol to its token; put that token into a cell
    from scfm_fast.vocab.targets import TargetResolver

    r = TargetResolver()
    sym, tok = next((s, int(r.token_dict[e])) for s, e in r.name_map.items()
                    if e in r.token_dict and 4 <= int(r.token_dict[e]) < 200)
    cell = np.array([tok] + [t for t in range(4, 12) if t != tok])
    ex, ref = _both([cell], model, perturbation="delete", genes=[sym])
    _assert_same(ex, ref)
    assert ex["gene_token"].tolist() == [tok] and ex["gene_name"].tolist() == [sym]
    # a name outside the dictionary is an error, not a screen of the other genes with exit 0
    with pytest.raises(ValueError, match="NOT_A_GENE_XYZ"):
        perturb_cells([cell], model, special_token_ids=SPECIAL, genes=[sym, "NOT_A_GENE_XYZ"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, "float16"])
def test_low_precision_autocast_close_to_fp32(dtype):
    # no fixed bf16 atol: the engine's low-precision error must stay within 2x the error of running the
    # reference layers in the same low precision (flash-attn's rule)
    m = tiny_model(1, std=0.15)
    cells = make_cells([30])
    ref = perturb_cells_reference(cells, m, special_token_ids=SPECIAL)
    lowp = perturb_cells(cells, m, special_token_ids=SPECIAL, dtype=dtype)
    dt = dtype if isinstance(dtype, torch.dtype) else torch.float16
    with torch.autocast("cpu", dtype=dt):
        base = perturb_cells_reference(cells, m, special_token_ids=SPECIAL)
    err = np.abs(lowp["cos_sim"] - ref["cos_sim"]).max()
    base_err = np.abs(base["cos_sim"] - ref["cos_sim"]).max()
    assert np.isfinite(lowp["cos_sim"]).all()
    assert err <= 2 * base_err + 1e-5
    assert np.corrcoef(lowp["shift"], ref["shift"])[0, 1] > 0.9


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["exact", "approx"])
def test_cuda_matches_cpu(mode):
    cells = make_cells([17, 40], v2=True)
    kw = dict(special_token_ids=SPECIAL, gene_shifts=True, mode=mode, approx_check_cells=0)
    cpu = perturb_cells(cells, tiny_model(), **kw)
    gpu = perturb_cells(cells, tiny_model(), device="cuda", **kw)
    np.testing.assert_allclose(gpu["cos_sim"], cpu["cos_sim"], rtol=0, atol=1e-5)
    bf16 = perturb_cells(cells, tiny_model(), device="cuda", dtype="bfloat16", **kw)
    assert np.corrcoef(bf16["shift"], cpu["shift"])[0, 1] > 0.95


def test_cls_pooling_needs_a_cls_token(model):
    with pytest.raises(ValueError, match="pooling='cls'"):
        perturb_cells(make_cells([5]), model, special_token_ids=SPECIAL, pooling="cls")


def test_no_layer_past_the_readout_is_computed():
    # poison the last layer: a readout at layer -2 must not touch it (no MLM head, no extra layers)
    m = tiny_model()
    cells = make_cells([11], v2=True)
    clean = perturb_cells(cells, m, special_token_ids=SPECIAL, layer=-2)
    with torch.no_grad():
        for p in m.encoder.layer[-1].parameters():
            p.fill_(float("nan"))
    for mode in ("exact", "approx"):
        df = perturb_cells(cells, m, special_token_ids=SPECIAL, layer=-2, mode=mode, approx_check_cells=0)
        assert np.isfinite(df["cos_sim"]).all()
    np.testing.assert_array_equal(perturb_cells(cells, m, special_token_ids=SPECIAL, layer=-2)["cos_sim"],
                                  clean["cos_sim"])


def test_bf16_weights_run_under_autocast():
    cells = make_cells([24])
    m16 = tiny_model(std=0.15).to(torch.bfloat16)
    ref = perturb_cells_reference(cells, tiny_model(std=0.15).to(torch.bfloat16).float(),
                                  special_token_ids=SPECIAL)  # the same rounded weights, fp32 maths
    ex = perturb_cells(cells, m16, special_token_ids=SPECIAL)
    # within 2x the error of the reference run on the same bf16 weights in bf16 maths
    base = perturb_cells_reference(cells, m16, special_token_ids=SPECIAL)
    err = np.abs(ex["cos_sim"] - ref["cos_sim"]).max()
    assert err <= 2 * np.abs(base["cos_sim"] - ref["cos_sim"]).max() + 1e-5
    assert np.corrcoef(ex["shift"], ref["shift"])[0, 1] > 0.95
    ap = perturb_cells(cells, m16, special_token_ids=SPECIAL, mode="approx", approx_check_cells=0)
    assert np.isfinite(ap["cos_sim"]).all()


def test_padding_is_dropped_and_overlong_cells_are_refused(model):
    cells = make_cells([7, 4])
    padded = np.zeros((2, 9), dtype=np.int64)
    for i, c in enumerate(cells):
        padded[i, :len(c)] = c
    a = perturb_cells(cells, model, special_token_ids=SPECIAL)
    b = perturb_cells(padded, model, special_token_ids=SPECIAL)
    np.testing.assert_allclose(a["cos_sim"], b["cos_sim"], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="longer than the model's 64 positions"):
        perturb_cells([np.arange(4, 70)], model, special_token_ids=SPECIAL)


def test_token_ids_outside_the_model_are_errors(model):
    cell = np.arange(4, 12)
    vocab = model.config.vocab_size
    for genes in ([5, vocab + 7], [5, (6, vocab)]):
        with pytest.raises(ValueError, match=f"token id .*the model has {vocab} tokens"):
            perturb_cells([cell], model, special_token_ids=SPECIAL, genes=genes, progress_bar=False)
    # cells holding ids past the model's vocabulary: a clear error before any forward (was an IndexError)
    with pytest.raises(ValueError, match=f"outside the model's vocabulary of {vocab}"):
        perturb_cells([cell, np.array([5, vocab + 3])], model, special_token_ids=SPECIAL, progress_bar=False)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("perturbation", ["delete", "overexpress", "inhibit"])
@pytest.mark.parametrize(("cell_readout", "state_shift"), [("genes", "aligned"), ("pooled", "all"),
                                                           ("pooled", "aligned")])
def test_readout_options(model, perturbation, v2, cell_readout, state_shift):
    cells = make_cells([7, 30], v2=v2)
    states = np.random.default_rng(1).normal(size=(2, 48))
    _assert_same(*_both(cells, model, perturbation=perturbation, cell_readout=cell_readout, pooling="mean",
                        state_shift=state_shift, target_embedding=states, target_names=["shift_a", "shift_b"],
                        batch_tokens=64))


def test_genes_readout_is_the_mean_of_the_gene_cosines(model):
    cells = make_cells([12, 20], v2=True)
    df = perturb_cells(cells, model, special_token_ids=SPECIAL, pooling="mean", gene_shifts=True)
    pooled = perturb_cells(cells, model, special_token_ids=SPECIAL, pooling="mean", cell_readout="pooled")
    np.testing.assert_allclose(df["cos_sim"], [np.mean(c.astype(np.float64)) for c in df["gene_shift_cos"]],
                               rtol=0, atol=1e-6)
    assert np.abs(df["cos_sim"] - pooled["cos_sim"]).max() > 1e-3  # two different quantities


def test_v2_datasets_pool_cls_by_default(model):
    import pyarrow as pa

    from scfm_fast.store.schema import with_table_config

    cells = make_cells([8, 12], v2=True)
    t = pa.table({"input_ids": pa.array([c.tolist() for c in cells], pa.list_(pa.int32()))})
    v2 = with_table_config(t, {"special_tokens": {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}})
    v1 = with_table_config(t, {"special_tokens": {"<pad>": 0, "<mask>": 1}})
    df = perturb_cells(v2, model, special_token_ids=SPECIAL)
    assert df.attrs["pooling"] == "cls"
    np.testing.assert_array_equal(df["cos_sim"], perturb_cells(cells, model, special_token_ids=SPECIAL,
                                                               pooling="cls")["cos_sim"])
    mean = perturb_cells(v2, model, special_token_ids=SPECIAL, pooling="mean")  # still possible, recorded
    assert mean.attrs["pooling"] == "mean" and not np.allclose(mean["cos_sim"], df["cos_sim"])
    assert perturb_cells(v1, model, special_token_ids=[0, 1]).attrs["pooling"] == "mean"
