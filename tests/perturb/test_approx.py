"""Approximate (KV-cache reuse) mode: labelled, measured against exact, exact where it must be."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scfm_fast.perturb import measure_approx_error, perturb_cells

from .conftest import SPECIAL, make_cells, tiny_model


def smooth_model() -> torch.nn.Module:
    """A random encoder whose position embeddings vary smoothly with rank, as trained ones do.

    (Independent random position vectors make a one-rank shift as large as a gene swap, which is the
    part of a perturbation the approximation leaves out of attention.)
    """
    m = tiny_model(2, std=0.1)
    L, H = m.embeddings.position_embeddings.weight.shape
    pos = torch.arange(L, dtype=torch.float32)[:, None]
    i = torch.arange(H, dtype=torch.float32)[None]
    freq = 1.0 / (200.0 ** (2 * (i // 2) / H))
    with torch.no_grad():
        m.embeddings.position_embeddings.weight.copy_(torch.where(i % 2 == 0, torch.sin(pos * freq),
                                                                  torch.cos(pos * freq)))
    return m


@pytest.mark.parametrize("perturbation", ["delete", "overexpress", "inhibit"])
def test_error_is_reported_small_and_nonzero(perturbation):
    m = smooth_model()
    cells = make_cells([20, 33], v2=True)
    df = perturb_cells(cells, m, perturbation=perturbation, mode="approx", special_token_ids=SPECIAL,
                       approx_check_cells=2)
    err = df.attrs["approx_error"]
    assert df.attrs["mode"] == "approx"
    assert set(err) >= {"max_abs_dcos", "mean_abs_dcos", "spearman_mean", "spearman_min"}
    ex = perturb_cells(cells, m, perturbation=perturbation, special_token_ids=SPECIAL)
    dcos = np.abs(df["cos_sim"].to_numpy() - ex["cos_sim"].to_numpy())
    assert err["max_abs_dcos"] == pytest.approx(dcos.max(), rel=1e-6, abs=1e-12)
    # nonzero: it is an approximation; small: a fraction of the effects it measures, rankings kept
    assert 1e-6 < dcos.max() < 0.6 * ex["shift"].max()
    assert dcos.mean() < 0.5 * ex["shift"].mean()
    assert err["spearman_mean"] > 0.75
    assert np.corrcoef(df["shift"], ex["shift"])[0, 1] > 0.9


def test_layer_zero_is_exact(model):
    cells = make_cells([15])
    m = measure_approx_error(cells, model, perturbation="delete", layer=0, special_token_ids=SPECIAL)
    assert m["max_abs_dcos"] < 1e-6


def test_delete_without_position_embeddings_is_exact_at_layer_one():
    # without position shifts the only change at layer 1 is the removed key: the softmax update is exact
    m = tiny_model()
    with torch.no_grad():
        m.embeddings.position_embeddings.weight.zero_()
    cells = make_cells([12, 30])
    one = measure_approx_error(cells, m, perturbation="delete", layer=1, special_token_ids=SPECIAL)
    assert one["max_abs_dcos"] < 1e-5 and one["spearman_min"] > 0.999
    pair = measure_approx_error(cells, m, perturbation="delete", layer=1, special_token_ids=SPECIAL,
                                genes=[(int(cells[1][2]), int(cells[1][9]))])
    assert pair["max_abs_dcos"] < 1e-5
    deeper = measure_approx_error(cells, m, perturbation="delete", layer=3, special_token_ids=SPECIAL)
    assert deeper["max_abs_dcos"] > 1e-7  # second-order effects are left out deeper down


def test_approx_supports_readouts_and_budget(model):
    cells = make_cells([9, 16], v2=True)
    a = perturb_cells(cells, model, mode="approx", special_token_ids=SPECIAL, batch_tokens=20,
                      gene_shifts=True, target_embedding=np.ones(48), approx_check_cells=0)
    b = perturb_cells(cells, model, mode="approx", special_token_ids=SPECIAL, batch_tokens=10_000,
                      gene_shifts=True, target_embedding=np.ones(48), approx_check_cells=0)
    np.testing.assert_allclose(a["cos_sim"], b["cos_sim"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(a["target_shift"], b["target_shift"], rtol=0, atol=1e-6)
    assert "approx_error" not in a.attrs
    assert all(len(t) == len(c) for t, c in zip(a["gene_shift_tokens"], a["gene_shift_cos"]))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_approx_readouts_equal_exact_where_the_approximation_is_exact(pooling):
    # delete at layer 1 without position embeddings is exact (see above): every readout of the
    # approximate engine (cosine, target shift, per-gene shifts) must then equal the exact engine's
    m = tiny_model()
    with torch.no_grad():
        m.embeddings.position_embeddings.weight.zero_()
    cells = make_cells([9, 21], v2=True)
    target = np.random.default_rng(0).normal(size=48)
    kw = dict(special_token_ids=SPECIAL, layer=1, pooling=pooling, gene_shifts=True, target_embedding=target)
    ap = perturb_cells(cells, m, mode="approx", approx_check_cells=0, **kw)
    ex = perturb_cells(cells, m, **kw)
    assert ap[["cell_index", "gene_token"]].equals(ex[["cell_index", "gene_token"]])
    for col in ("cos_sim", "target_shift"):
        np.testing.assert_allclose(ap[col], ex[col], rtol=0, atol=1e-5)
    for ta, te, ca, ce in zip(ap["gene_shift_tokens"], ex["gene_shift_tokens"], ap["gene_shift_cos"],
                              ex["gene_shift_cos"]):
        np.testing.assert_array_equal(ta, te)
        np.testing.assert_allclose(ca, ce, rtol=0, atol=1e-5)
