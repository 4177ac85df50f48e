"""``forward_species_rows`` (the last layer for the species rows only): equal to ``forward_varlen``'s species rows
and to GeneCompass's own outputs (fixture), with and without attention mask, under bf16 autocast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scfm_fast.kernels.padding import unpad
from scfm_fast.model.genecompass_checkpoint import load_genecompass
from tests._genecompass import fixture_path, small_genecompass

TOL = {"atol": 1e-5, "rtol": 1e-6}


@pytest.fixture(scope="module")
def model(shared_dir):
    return load_genecompass(fixture_path(shared_dir) / "model").eval()


@pytest.mark.parametrize("name", ["mask", "nomask", "species_all1", "long_mask", "trim_c2"])
def test_species_rows_match_genecompass_every_layer(model, shared_dir, name):
    z = np.load(fixture_path(shared_dir) / "cases" / f"{name}.npz")
    t = {k: torch.from_numpy(z[k]) for k in z.files}
    ids, vals, mask = t["input_ids"], t["values"], t.get("attention_mask")
    b, n = ids.shape
    sp = t["species"].reshape(-1) if "species" in t else None
    nomask = mask is None
    m = torch.ones_like(ids) if nomask else mask
    flat_ids, _, cu, max_len = unpad(ids, m)
    kw = {"no_attention_mask": nomask, "pad_to": n if nomask else None}
    with torch.inference_mode():
        for k in range(model.config.num_hidden_layers + 1):
            got = model.forward_species_rows(flat_ids, unpad(vals, m)[0], sp, cu, max_len, layer=k, **kw)
            torch.testing.assert_close(got, t["hidden_states"][k][:, 0], **TOL)
            h, _, cu_new = model.forward_varlen(flat_ids, unpad(vals, m)[0], sp, cu, max_len, layer=k, **kw)
            torch.testing.assert_close(got, h[cu_new[:-1].long()], atol=2e-6, rtol=0)


def test_mixed_lengths_one_gene_cells_and_bf16(model):
    g = torch.Generator().manual_seed(0)
    lens = [7, 1, 30, 12, 64, 1]
    ids = torch.randint(2, model.config.vocab_size, (sum(lens),), generator=g)
    vals = torch.rand(ids.numel(), generator=g) * 5
    sp, cu = torch.tensor([0, 1, 0, 1, 1, 0]), torch.tensor([0, *lens]).cumsum(0).int()
    with torch.inference_mode():
        h, _, cu_new = model.forward_varlen(ids, vals, sp, cu, 64)
        ref = h[cu_new[:-1].long()]
        torch.testing.assert_close(model.forward_species_rows(ids, vals, sp, cu, 64), ref, **TOL)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lowp = model.forward_species_rows(ids, vals, sp, cu, 64).float()
            h16, _, _ = model.forward_varlen(ids, vals, sp, cu, 64)
    err, err_full = (lowp - ref).abs().max(), (h16[cu_new[:-1].long()].float() - ref).abs().max()
    assert err <= 2 * err_full + 1e-3, (err, err_full)


def test_refused_in_training_and_without_species_row(model):
    ids, vals, cu = torch.tensor([2, 3, 4]), torch.rand(3), torch.tensor([0, 3], dtype=torch.int32)
    model.train()
    try:
        assert model.config.attention_probs_dropout_prob > 0  # the fixture's: dropout would be skipped silently
        with pytest.raises(ValueError, match="eval mode"):
            model.forward_species_rows(ids, vals, None, cu, 3)
    finally:
        model.eval()
    no_cls = small_genecompass(n_layers=1, use_cls_token=False)
    with pytest.raises(ValueError, match="no species row"):
        no_cls.forward_species_rows(ids, vals, None, cu, 3)
