"""GeneCompass's pretraining objective on the trainer: its masking (values -1 at masked and randomised
positions), the loss against GeneCompass's own ``mlm_loss`` case and a plain PyTorch implementation (values
and gradients), and a short ``scfm pretrain`` run on real cells that lowers both terms and saves
GeneCompass-layout checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scfm_fast.loader import pack_cells
from scfm_fast.model.genecompass_checkpoint import load_genecompass
from scfm_fast.pretrain.data import MaskedBatch
from scfm_fast.pretrain.masking import Masker
from scfm_fast.pretrain.objectives import GeneCompassObjective, genecompass_loss, genecompass_loss_sums


@pytest.fixture(scope="module")
def fixture_dir(shared_dir):
    p = shared_dir / "genecompass_fixture"
    if not p.is_dir():
        pytest.skip(f"GeneCompass fixture not found in {p}")
    return p


def test_masking_with_values():
    m = Masker(vocab_size=500, mask_id=1, protected=(0, 1), prob=0.15, seed=3)
    rng = np.random.default_rng(0)
    tok = rng.integers(2, 500, 4000)
    tok[:5] = 0  # protected ids are never selected
    vals = rng.random(4000).astype(np.float32) * 5 + 0.1
    ids, vin, pos, lab, lab_v = m.with_values(tok, vals, epoch=2, sample=11)
    ids0, pos0, lab0 = m(tok, epoch=2, sample=11)  # the same draw as without values
    assert np.array_equal(ids, ids0) and np.array_equal(pos, pos0) and np.array_equal(lab, lab0)
    assert np.array_equal(lab, tok[pos]) and np.array_equal(lab_v, vals[pos])  # labels: original ids and values
    other = np.setdiff1d(np.arange(tok.size), pos)
    assert np.array_equal(vin[other], vals[other])  # unselected values untouched
    assert np.all(vin[ids == 1] == -1)  # every masked position
    changed = ids[pos] != tok[pos]  # randomised to another id: -1 too
    assert np.all(vin[pos[changed]] == -1)
    kept = vin[pos] != -1  # the rest keep their value (kept positions, ~10% of the selected)
    assert np.array_equal(vin[pos[kept]], vals[pos[kept]]) and np.array_equal(ids[pos[kept]], tok[pos[kept]])
    assert 0.05 < kept.mean() < 0.16 and 0.12 < pos.size / tok.size < 0.18
    assert not np.any(np.isin(pos, np.arange(5)))
    with pytest.raises(ValueError, match="values for"):
        m.with_values(tok, vals[:-1], epoch=0, sample=0)


def _fixture_batch(fixture_dir):
    z = np.load(fixture_dir / "cases" / "mlm_loss.npz")
    mask = z["attention_mask"].astype(bool)
    cells = [torch.from_numpy(r[k]) for r, k in zip(z["input_ids"], mask)]
    packed = pack_cells([c.numpy() for c in cells])
    sel = z["labels"][mask] != -100
    return MaskedBatch(packed, torch.from_numpy(np.flatnonzero(sel)), torch.from_numpy(z["labels"][mask][sel]),
                       len(cells), values=torch.from_numpy(z["values"][mask]),
                       species=torch.from_numpy(z["species"].ravel()),
                       label_values=torch.from_numpy(z["labels_values"][mask][sel])), z


def _plain(model, z):
    """Straightforward PyTorch: padded forward, full logits, CE with ignore_index and MSE on the selected rows."""
    t = {k: torch.from_numpy(z[k]) for k in ("input_ids", "values", "species", "attention_mask", "labels",
                                             "labels_values")}
    h = model.gene_rows_padded(model.forward_padded(t["input_ids"], t["values"], t["species"], t["attention_mask"]))
    p = model.cls.predictions
    logits = F.linear(p.transform.LayerNorm(F.gelu(p.transform.dense(h))),
                      model.bert.embeddings.word_embeddings.weight, p.bias)
    v = model.cls4value.predictions
    vp = F.linear(v.transform.LayerNorm(F.gelu(v.transform.dense(h))), v.decoder.weight, v.bias)[..., 0]
    sel = t["labels"] != -100
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t["labels"].reshape(-1), ignore_index=-100)
    mse = F.mse_loss(vp[sel], t["labels_values"][sel])
    return 0.2 * ce + 0.8 * mse, ce, mse


def test_loss_equals_genecompass_and_plain_pytorch(fixture_dir):
    model = load_genecompass(fixture_dir / "model").train(False)
    assert model.config.hidden_act == "gelu"  # _plain's transform uses exact GELU
    batch, z = _fixture_batch(fixture_dir)
    ce, se, correct = genecompass_loss_sums(model, batch, chunk=7)  # several chunks
    n = batch.labels.numel()
    loss = genecompass_loss(ce, se, n)
    # GeneCompass's own loss on this masked batch (its forward with labels)
    for got, key in ((loss, "loss"), (ce / n, "id_loss"), (se / n, "value_loss")):
        np.testing.assert_allclose(float(got.detach()), float(z[key]), rtol=1e-5, atol=1e-6)
    ref, ref_ce, ref_mse = _plain(model, z)
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5, atol=1e-6)
    # gradients of every trainable parameter equal those of the plain implementation
    params = [p for p in model.parameters() if p.requires_grad]
    g_fast = torch.autograd.grad(loss, params, allow_unused=True)
    g_ref = torch.autograd.grad(ref, params, allow_unused=True)
    for (name, _), a, b in zip([(n_, p) for n_, p in model.named_parameters() if p.requires_grad], g_fast, g_ref):
        if b is None:
            assert a is None or float(a.abs().max()) == 0, name
            continue
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)
    # the trainer's calling convention: (0.2 CE + 0.8 SE) summed; id/value means logged
    obj = GeneCompassObjective()
    ls, c = obj(model, None, batch)
    np.testing.assert_allclose(float(ls) / n, float(ref), rtol=1e-5)
    assert int(c) == int(correct)
    logged = obj.flush()
    np.testing.assert_allclose([logged["id_loss"], logged["value_loss"]], [float(ref_ce), float(ref_mse)], rtol=1e-5)
