"""GeneCompass's inference gene table (cat_fc's gene-only part): equal to the plain per-row path, never stale."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scfm_fast.kernels.padding import unpad
from scfm_fast.model.genecompass import GeneCompassModel
from scfm_fast.model.genecompass_checkpoint import load_genecompass
from tests._genecompass import fixture_path, small_genecompass

TOL = {"atol": 1e-5, "rtol": 1e-6}
CASES = ["mask", "nomask", "species_all1", "long_mask"]


@pytest.fixture(scope="module")
def model(shared_dir):
    return load_genecompass(fixture_path(shared_dir) / "model").eval()


def _plain(e, *args):
    """The embeddings through GeneCompass's own per-row computation."""
    e.cache_gene_table = False
    try:
        with torch.no_grad():
            return e(*args)
    finally:
        del e.cache_gene_table  # back to the class default


def _rows(model, seed=0, n=300):
    """``n`` rows mixing human and mouse cells, mouse rows on genes that have a homolog."""
    g = torch.Generator().manual_seed(seed)
    v, hi = model.config.vocab_size, model.bert.embeddings.homologous_index
    ids = torch.randint(0, v, (n,), generator=g)
    ids[::5] = torch.nonzero(hi != torch.arange(v)).flatten()[torch.randint(0, 5, (len(ids[::5]),), generator=g)]
    return ids, torch.rand(n, generator=g) * 6, torch.arange(n) % 2, torch.randint(0, 64, (n,), generator=g)


@pytest.mark.parametrize("name", CASES)
def test_cached_forwards_match_genecompass(model, shared_dir, name):
    z = np.load(fixture_path(shared_dir) / "cases" / f"{name}.npz")
    t = {k: torch.from_numpy(z[k]) for k in z.files}
    ids, vals, mask = t["input_ids"], t["values"], t.get("attention_mask")
    b, n = ids.shape
    sp = t["species"].reshape(-1) if "species" in t else torch.zeros(b, dtype=torch.long)
    model.bert.embeddings.invalidate_gene_table()
    with torch.inference_mode():
        kw = {"no_attention_mask": True} if mask is None else {"attention_mask": mask}
        h = model.forward_padded(ids, vals, sp, **kw)
        assert model.bert.embeddings._gene_table is not None  # the cached path ran
        torch.testing.assert_close(h, t["last_hidden_state"], **TOL)
        m = torch.ones_like(ids) if mask is None else mask
        flat_ids, _, cu, max_len = unpad(ids, m)
        nomask = mask is None
        h, rows, cu_new = model.forward_varlen(flat_ids, unpad(vals, m)[0], sp, cu, max_len,
                                               no_attention_mask=nomask, pad_to=n if nomask else None)
    ref = t["last_hidden_state"]
    torch.testing.assert_close(h[cu_new[:-1].long()], ref[:, 0], **TOL)
    torch.testing.assert_close(h[rows], unpad(ref[:, 1:], m)[0], **TOL)


def test_cached_equals_plain_human_and_mouse_rows_across_calls(model):
    e = model.bert.embeddings
    e.invalidate_gene_table()
    ids, vals, sp, pos = _rows(model)
    plain = _plain(e, ids, vals, sp, pos, 1.0)
    with torch.inference_mode():
        first = e(ids[:150], vals[:150], sp[:150], pos[:150])  # fills part of the table
        full = e(ids, vals, sp, pos)  # reuses it, fills the rest
        as_human = e(ids, vals, torch.zeros_like(sp), pos)
    torch.testing.assert_close(first, plain[:150], **TOL)
    torch.testing.assert_close(full, plain, **TOL)
    torch.testing.assert_close(as_human, _plain(e, ids, vals, torch.zeros_like(sp), pos, 1.0), **TOL)
    mouse_genes = (sp == 1) & (e.homologous_index[ids] != ids)
    assert mouse_genes.any() and (as_human[mouse_genes] - full[mouse_genes]).abs().amax() > 1e-3
    with torch.no_grad():  # no_grad (not inference mode) reuses the same table
        torch.testing.assert_close(e(ids, vals, sp, pos), plain, **TOL)
    with torch.inference_mode():  # and alpha is part of the key
        torch.testing.assert_close(e(ids, vals, sp, pos, torch.tensor(0.25)), _plain(e, ids, vals, sp, pos, 0.25),
                                   **TOL)


def test_table_rebuilt_after_weight_changes(model, tmp_path):
    from scfm_fast.model.genecompass_checkpoint import save_genecompass

    m = load_genecompass(save_genecompass(model, tmp_path / "m")).eval()
    e = m.bert.embeddings
    ids, vals, sp, pos = _rows(m, seed=1)
    with torch.inference_mode():
        before = e(ids, vals, sp, pos)
    # an optimizer step on the knowledge projection and the word embeddings (in place, as optimizers do)
    opt = torch.optim.SGD([e.promoter_embeddings.linear1.weight, e.word_embeddings.weight], lr=1.0)
    m.train()
    m.forward_padded(ids[None, :20], vals[None, :20], sp[:1]).square().mean().backward()
    opt.step()
    m.eval()
    with torch.inference_mode():
        after = e(ids, vals, sp, pos)
    torch.testing.assert_close(after, _plain(e, ids, vals, sp, pos, 1.0), **TOL)
    assert (after - before).abs().amax() > 1e-4
    # a buffer and cat_fc changed in place, and a load_state_dict
    with torch.no_grad():
        e.homologous_index.copy_(torch.roll(e.homologous_index, 1))
        e.concat_embeddings.cat_fc.bias.add_(0.5)
    with torch.inference_mode():
        torch.testing.assert_close(e(ids, vals, sp, pos), _plain(e, ids, vals, sp, pos, 1.0), **TOL)
    m.load_state_dict(model.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(e(ids, vals, sp, pos), before, **TOL)


def test_table_follows_dtype_changes(model):
    m = GeneCompassModel(model.gcfg)
    m.load_state_dict(model.state_dict())
    m.eval()
    e = m.bert.embeddings
    ids, vals, sp, pos = _rows(m, seed=2)
    with torch.inference_mode():
        f32 = e(ids, vals, sp, pos)
    m.double()
    with torch.inference_mode():
        f64 = e(ids, vals.double(), sp, pos)
    assert f64.dtype == torch.float64 and e._gene_table.rows.dtype == torch.float64
    torch.testing.assert_close(f64, _plain(e, ids, vals.double(), sp, pos, 1.0), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(f64.float(), f32, **TOL)
    m.float()
    with torch.inference_mode():
        torch.testing.assert_close(e(ids, vals, sp, pos), f32, **TOL)
        assert e._gene_table.rows.dtype == torch.float32


def test_training_and_grad_mode_never_use_the_table(model):
    m = GeneCompassModel(model.gcfg)
    m.load_state_dict(model.state_dict())
    e = m.bert.embeddings
    ids, vals, sp, pos = _rows(m, seed=3, n=40)
    m.eval()
    out = e(ids, vals, sp, pos)  # grad enabled: plain path, differentiable
    assert e._gene_table is None and out.requires_grad
    m.train()
    with torch.no_grad():
        e(ids, vals, sp, pos)
    assert e._gene_table is None
    out.sum().backward()
    assert e.promoter_embeddings.linear1.weight.grad is not None


@pytest.mark.parametrize("switches", [{"use_values": False}, {"use_promoter": False, "use_co_exp": False,
                                                              "use_gene_family": False, "use_peca_grn": False}])
def test_switches_cached_equals_plain(switches):
    m = small_genecompass(n_layers=1, **switches)
    e = m.bert.embeddings
    ids = torch.randint(0, 40, (50,))
    vals, sp, pos = torch.rand(50) * 5, torch.arange(50) % 2, torch.randint(0, 32, (50,))
    with torch.inference_mode():
        torch.testing.assert_close(e(ids, vals, sp, pos), _plain(e, ids, vals, sp, pos, 1.0), **TOL)
    assert e._gene_table.rows.shape[0] == 40 * (2 if m.gcfg.knowledge else 1)
