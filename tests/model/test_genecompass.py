"""GeneCompass model against the outputs of GeneCompass's own code (``genecompass_fixture``), padded and varlen."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from scfm_fast._errors import InputFileError
from scfm_fast.kernels.padding import unpad
from scfm_fast.model.genecompass import genecompass_loss, pool_cells
from scfm_fast.model.genecompass_checkpoint import (
    check_token_dictionary,
    is_genecompass_config,
    load_genecompass,
    save_genecompass,
)
from tests._helpers import assert_close_to_baseline

TOL = {"atol": 1e-5, "rtol": 1e-6}  # fp32 against GeneCompass's eager outputs
#: the MLM logits are one more GEMM over the hidden size, whose blocking (so its fp32 rounding) depends on
#: the CPU's BLAS kernels: max abs ~1e-5 on an AMD EPYC host, 1.11e-5 on an Intel AVX-512 one
LOGITS_TOL = {"atol": 3e-5, "rtol": 1e-6}
CASES = ["nomask", "mask", "species_none", "species_all0", "species_all1", "trim_c0", "trim_c1", "trim_c2",
         "trim_c3", "long_mask", "long_nomask", "mlm_loss"]


@pytest.fixture(scope="module")
def fixture_dir(shared_dir):
    p = shared_dir / "genecompass_fixture"
    if not (p / "model" / "pytorch_model.bin").exists():
        pytest.skip(f"GeneCompass fixture not found in {p}")
    return p


@pytest.fixture(scope="module")
def model(fixture_dir):
    return load_genecompass(fixture_dir / "model")


def _case(fixture_dir, name):
    z = np.load(fixture_dir / "cases" / f"{name}.npz")
    return {k: torch.from_numpy(z[k]) for k in z.files}


def _inputs(fixture_dir, name):
    """(case, ids, values, attention mask or None, species per cell: absent = human)."""
    t = _case(fixture_dir, name)
    ids = t["input_ids"]
    sp = t["species"].reshape(-1) if "species" in t else torch.zeros(ids.shape[0], dtype=torch.long)
    return t, ids, t["values"], t.get("attention_mask"), sp


def test_all_fixture_cases_are_tested(fixture_dir):
    assert sorted(p.stem for p in (fixture_dir / "cases").glob("*.npz")) == sorted(CASES)


@pytest.mark.parametrize("name", CASES)
def test_padded_matches_genecompass(model, fixture_dir, name):
    t, ids, vals, mask, sp = _inputs(fixture_dir, name)
    b, n = ids.shape
    e = model.bert.embeddings
    cin = e.concat_input(ids, vals, sp[:, None].expand(b, n), model.emb_warmup.alpha)
    torch.testing.assert_close(cin, t["emb_concat_in"], **TOL)
    torch.testing.assert_close(e.concat_embeddings(cin), t["emb_concat_out"], **TOL)
    pos = torch.arange(n).expand(b, n)
    torch.testing.assert_close(e(ids, vals, sp[:, None].expand(b, n), pos), t["emb_out"], **TOL)
    # no mask given = GeneCompass's scripts: every padded position attends
    kw = {"no_attention_mask": True} if mask is None else {"attention_mask": mask}
    species = t.get("species")  # species_none: absent, read as human
    for k in range(model.config.num_hidden_layers + 1):
        h = model.forward_padded(ids, vals, species, layer=k, **kw)
        torch.testing.assert_close(h, t["hidden_states"][k], **TOL)
    torch.testing.assert_close(h, t["last_hidden_state"], **TOL)
    g = model.gene_rows_padded(h)
    torch.testing.assert_close(model.mlm_logits(g), t["logits"], **LOGITS_TOL)
    torch.testing.assert_close(model.value_prediction(g), t["value_pred"], **TOL)


@pytest.mark.parametrize("name", CASES)
def test_varlen_matches_genecompass(model, fixture_dir, name):
    t, ids, vals, mask, sp = _inputs(fixture_dir, name)
    b, n = ids.shape
    nomask = mask is None and name.endswith("nomask")
    if mask is None:
        mask = torch.ones_like(ids)
    lengths = mask.sum(1)
    flat_ids, _, cu, max_len = unpad(ids, mask)
    flat_vals = unpad(vals, mask)[0]
    for k in range(model.config.num_hidden_layers + 1):
        h, rows, cu_new = model.forward_varlen(flat_ids, flat_vals, sp, cu, max_len, layer=k,
                                               no_attention_mask=nomask, pad_to=n if nomask else None)
        ref = t["hidden_states"][k]
        if nomask:  # every padded row is part of its cell: the whole padded output comes back
            torch.testing.assert_close(h.view(b, n + 1, -1), ref, **TOL)
        torch.testing.assert_close(h[cu_new[:-1].long()], ref[:, 0], **TOL)  # the species rows
        torch.testing.assert_close(h[rows], unpad(ref[:, 1:], mask)[0], **TOL)
    assert rows.numel() == int(lengths.sum())
    torch.testing.assert_close(model.mlm_logits(h[rows]), unpad(t["logits"], mask)[0], **LOGITS_TOL)
    torch.testing.assert_close(model.value_prediction(h[rows]), unpad(t["value_pred"], mask)[0], **TOL)


def test_homolog_remap_only_changes_knowledge_of_mouse_cells(model):
    e = model.bert.embeddings
    hi = e.homologous_index
    mouse = torch.nonzero(hi != torch.arange(hi.numel())).flatten()
    assert mouse.numel() > 0
    ids = mouse[None]
    vals = torch.rand(ids.shape)
    human = e.concat_input(ids, vals, torch.zeros_like(ids))
    as_mouse = e.concat_input(ids, vals, torch.ones_like(ids))
    remapped = e.concat_input(hi[ids], vals, torch.zeros_like(ids))
    h = model.config.hidden_size
    torch.testing.assert_close(as_mouse[..., :h + 1], human[..., :h + 1], rtol=0, atol=0)  # word and value
    torch.testing.assert_close(as_mouse[..., h + 1:], remapped[..., h + 1:], rtol=0, atol=0)  # priors
    assert not torch.allclose(as_mouse[..., h + 1:], human[..., h + 1:])


def _mixed_batch(model, seed=0, lengths=(7, 1, 30, 12, 64)):
    g = torch.Generator().manual_seed(seed)
    v, hi = model.config.vocab_size, model.bert.embeddings.homologous_index
    mouse_ids = torch.nonzero(hi != torch.arange(v)).flatten()
    cells, values = [], []
    for n in lengths:
        c = torch.randint(2, v, (n,), generator=g)
        c[: min(n, 3)] = mouse_ids[torch.randint(0, mouse_ids.numel(), (min(n, 3),), generator=g)]
        cells.append(c)
        values.append(torch.rand(n, generator=g) * 6)
    species = torch.tensor([i % 2 for i in range(len(lengths))])
    return cells, values, species


def _padded_and_packed(cells, values):
    """Right-padded ``(B, n)`` ids, values and mask of the cells, their ``cu_seqlens`` and ``n``."""
    lengths = torch.tensor([c.numel() for c in cells])
    b, n = len(cells), int(lengths.max())
    ids, vals = torch.zeros(b, n, dtype=torch.long), torch.zeros(b, n)
    for i, (c, v) in enumerate(zip(cells, values)):
        ids[i, :c.numel()], vals[i, :c.numel()] = c, v
    mask = torch.arange(n)[None] < lengths[:, None]
    return ids, vals, mask, torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()]), n


def test_varlen_equals_padded_human_and_mouse(model):
    cells, values, species = _mixed_batch(model)
    ids, vals, mask, cu, n = _padded_and_packed(cells, values)
    lengths = mask.sum(1)
    ref = model.forward_padded(ids, vals, species, mask)
    h, rows, cu_new = model.forward_varlen(torch.cat(cells), torch.cat(values), species, cu, n)
    assert cu_new.tolist() == [int(x) + i for i, x in enumerate(cu)]
    torch.testing.assert_close(h[rows], unpad(ref[:, 1:], mask)[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(h[cu_new[:-1].long()], ref[:, 0], atol=1e-4, rtol=0)
    # species matters for the species row and, through the remap, for the mouse genes
    h0, _, _ = model.forward_varlen(torch.cat(cells), torch.cat(values), torch.zeros_like(species), cu, n)
    assert (h0 - h).abs().amax() > 1e-2
    # pooling: species row, or the mean over genes as a padded masked mean
    torch.testing.assert_close(pool_cells(h, cu_new, rows, pool="cls"), ref[:, 0], atol=1e-4, rtol=0)
    mean_ref = (ref[:, 1:] * mask[..., None]).sum(1) / lengths[:, None]
    torch.testing.assert_close(pool_cells(h, cu_new, rows, pool="mean"), mean_ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="pool='max'"):
        pool_cells(h, cu_new, rows, pool="max")


def test_no_attention_mask_pads_attend(model, fixture_dir):
    t, ids, vals, mask, sp = _inputs(fixture_dir, "mask")
    flat_ids, _, cu, max_len = unpad(ids, mask)
    flat_vals = unpad(vals, mask)[0]
    masked, masked_rows, _ = model.forward_varlen(flat_ids, flat_vals, sp, cu, max_len)
    h, rows, _ = model.forward_varlen(flat_ids, flat_vals, sp, cu, max_len, no_attention_mask=True, pad_to=16)
    nomask_ref = _case(fixture_dir, "nomask")["last_hidden_state"]  # same cells, run by GeneCompass unmasked
    torch.testing.assert_close(h[rows], unpad(nomask_ref[:, 1:], mask)[0], **TOL)
    assert (h[rows] - masked[masked_rows]).abs().amax() > 1e-2  # the quirk changes real rows: off by default


def test_loss_matches_genecompass_and_plain_pytorch(model, fixture_dir):
    t = _case(fixture_dir, "mlm_loss")
    h = model.forward_padded(t["input_ids"], t["values"], t["species"], t["attention_mask"])
    g = model.gene_rows_padded(h)
    with torch.no_grad():
        logits, vp = model.mlm_logits(g), model.value_prediction(g)
    loss, id_loss, value_loss = genecompass_loss(logits, t["labels"], vp, t["labels_values"])
    torch.testing.assert_close(id_loss, t["id_loss"], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(value_loss, t["value_loss"], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(loss, t["loss"], atol=1e-5, rtol=1e-6)
    # written out by hand: mean over selected positions of -log p(label) and of squared value errors
    ce, se, n = 0.0, 0.0, 0
    for i, j in torch.nonzero(t["labels"] != -100).tolist():
        lab = int(t["labels"][i, j])
        ce += float(torch.logsumexp(logits[i, j].double(), 0) - logits[i, j, lab].double())
        se += float((vp[i, j].double() - t["labels_values"][i, j].double()) ** 2)
        n += 1
    assert n == int((t["labels"] != -100).sum()) > 0
    assert id_loss.item() == pytest.approx(ce / n, rel=1e-6)
    assert value_loss.item() == pytest.approx(se / n, rel=1e-6)
    assert loss.item() == pytest.approx(0.2 * ce / n + 0.8 * se / n, rel=1e-6)


def test_loss_without_value_head_is_the_id_loss():
    logits = torch.randn(5, 7)
    labels = torch.tensor([1, -100, 3, -100, 6])
    loss, id_loss, value_loss = genecompass_loss(logits, labels)
    assert torch.equal(loss, id_loss) and value_loss.item() == 0.0


def test_save_reload_same_layout_and_outputs(model, fixture_dir, tmp_path):
    out = save_genecompass(model, tmp_path / "gc")
    saved = torch.load(out / "pytorch_model.bin", weights_only=True)
    orig = torch.load(fixture_dir / "model" / "pytorch_model.bin", weights_only=True)
    assert saved.keys() == orig.keys()
    for k in orig:
        assert torch.equal(saved[k], orig[k]) or k == "emb_warmup.steps", k  # steps counts GeneCompass's forwards
    cfg, cfg_orig = json.loads((out / "config.json").read_text()), json.loads(
        (fixture_dir / "model" / "config.json").read_text())
    for k, v in cfg_orig.items():
        if k not in ("dtype", "transformers_version", "use_cache"):
            assert cfg[k] == v, k
    again = load_genecompass(out)
    t = _case(fixture_dir, "mask")
    args = (t["input_ids"], t["values"], t["species"], t["attention_mask"])
    assert torch.equal(again.forward_padded(*args), model.forward_padded(*args))
    flat, _, cu, n = unpad(t["input_ids"], t["attention_mask"])
    vals = unpad(t["values"], t["attention_mask"])[0]
    assert torch.equal(again.forward_varlen(flat, vals, t["species"], cu, n)[0],
                       model.forward_varlen(flat, vals, t["species"], cu, n)[0])
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_config_detection(fixture_dir, shared_dir):
    assert is_genecompass_config(json.loads((fixture_dir / "model" / "config.json").read_text()))
    assert not is_genecompass_config({"model_type": "bert", "vocab_size": 25426, "hidden_act": "relu"})
    gf = shared_dir / "geneformer_v1"
    for c in gf.glob("**/config.json"):
        assert not is_genecompass_config(json.loads(c.read_text())), c


def test_token_dictionary_size_is_checked(model, fixture_dir, tmp_path):
    check_token_dictionary(model, fixture_dir / "model" / "token_dictionary.pkl")
    with (fixture_dir / "model" / "token_dictionary.pkl").open("rb") as f:
        d = pickle.load(f)
    d.pop(next(reversed(d)))
    bad = tmp_path / "older_dict.pkl"
    bad.write_bytes(pickle.dumps(d))
    with pytest.raises(InputFileError, match=r"older_dict.pkl has 101 entries .* 102 word-embedding rows"):
        load_genecompass(fixture_dir / "model", token_dictionary=bad)


def test_bad_checkpoints_refused(fixture_dir, tmp_path):
    with pytest.raises(InputFileError, match="not a checkpoint directory"):
        load_genecompass(tmp_path / "nowhere")
    gf = tmp_path / "geneformer"
    gf.mkdir()
    (gf / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    with pytest.raises(InputFileError, match="no GeneCompass keys"):
        load_genecompass(gf)
    broken = tmp_path / "broken"
    broken.mkdir()
    cfg = json.loads((fixture_dir / "model" / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**cfg, "use_peca_grn": False}))
    (broken / "pytorch_model.bin").write_bytes((fixture_dir / "model" / "pytorch_model.bin").read_bytes())
    with pytest.raises(InputFileError, match="unexpected .*peca_grn"):
        load_genecompass(broken)


def test_bad_inputs_refused(model):
    ids, vals, cu = torch.tensor([2, 3, 4]), torch.ones(3), torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="species must be 0"):
        model.forward_varlen(ids, vals, torch.tensor([2]), cu, 3)
    with pytest.raises(ValueError, match="one per cell"):
        model.forward_varlen(ids, vals, torch.tensor([0, 1]), cu, 3)
    with pytest.raises(ValueError, match="one shape"):
        model.forward_varlen(ids, vals[:2], None, cu, 3)
    with pytest.raises(ValueError, match="0..101"):
        model.forward_varlen(torch.tensor([2, 3, 102]), vals, None, cu, 3)
    with pytest.raises(ValueError, match="64 positions"):
        model.forward_varlen(torch.full((65,), 2), torch.ones(65), None, torch.tensor([0, 65], dtype=torch.int32), 65)
    with pytest.raises(TypeError, match="needs values and species"):
        model.bert.forward_varlen(ids, cu, 3)


@pytest.mark.parametrize("switches", [{"use_cls_token": False}, {"use_values": False, "use_co_exp": False},
                                      {"use_promoter": False, "use_co_exp": False, "use_gene_family": False,
                                       "use_peca_grn": False}])
def test_switches_varlen_equals_padded(switches, tmp_path):
    from tests._genecompass import small_genecompass

    model = small_genecompass(**switches)
    assert model.cls4value.predictions.decoder.weight.shape == (1, 16)  # saved whatever the switches
    lengths = torch.tensor([5, 1, 17])
    cells = [torch.randint(2, 40, (int(n),)) for n in lengths]
    values = [torch.rand(int(n)) * 5 for n in lengths]
    species = torch.tensor([1, 0, 1])
    ids, vals, mask, cu, n = _padded_and_packed(cells, values)
    ref = model.forward_padded(ids, vals, species, mask)
    h, rows, cu_new = model.forward_varlen(torch.cat(cells), torch.cat(values), species, cu, n)
    off = 1 if model.gcfg.use_cls_token else 0
    assert ref.shape[1] == n + off and h.shape[0] == int(lengths.sum()) + off * 3
    torch.testing.assert_close(h[rows], unpad(ref[:, off:], mask)[0], atol=1e-4, rtol=0)
    again = load_genecompass(save_genecompass(model, tmp_path / "m"))
    assert torch.equal(again.forward_varlen(torch.cat(cells), torch.cat(values), species, cu, n)[0], h)


def test_bf16_autocast_error_within_twice_the_reference(model, fixture_dir):
    t = _case(fixture_dir, "mask")
    flat, _, cu, n = unpad(t["input_ids"], t["attention_mask"])
    vals = unpad(t["values"], t["attention_mask"])[0]
    ref, rows, cu_new = model.forward_varlen(flat, vals, t["species"], cu, n)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.forward_varlen(flat, vals, t["species"], cu, n)[0]
        base = model.forward_padded(t["input_ids"], t["values"], t["species"], t["attention_mask"])
    assert low.dtype == torch.bfloat16
    assert_close_to_baseline(low[rows], ref[rows], unpad(base[:, 1:], t["attention_mask"])[0])
    assert_close_to_baseline(low[cu_new[:-1].long()], ref[cu_new[:-1].long()], base[:, 0])


def test_bad_packing_refused(model):
    ids, vals = torch.tensor([2, 3, 4]), torch.ones(3)
    with pytest.raises(ValueError, match="does not describe 3 genes"):
        model.forward_varlen(ids, vals, None, torch.tensor([0, 2], dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="longest cell 3"):
        model.forward_varlen(ids, vals, None, torch.tensor([0, 3], dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="pad_to only applies"):
        model.forward_varlen(ids, vals, None, torch.tensor([0, 3], dtype=torch.int32), 3, pad_to=8)
    with pytest.raises(ValueError, match="more than pad_to=2"):
        model.forward_varlen(ids, vals, None, torch.tensor([0, 3], dtype=torch.int32), 3, no_attention_mask=True,
                             pad_to=2)


def test_varlen_gradients_equal_padded(model, fixture_dir):
    """The training path: the loss and every parameter's gradient agree between varlen and padded."""
    t, ids, vals, mask, sp = _inputs(fixture_dir, "mlm_loss")
    flat, _, cu, n = unpad(ids, mask)
    lab, lv = unpad(t["labels"], mask)[0], unpad(t["labels_values"], mask)[0]
    h, rows, _ = model.forward_varlen(flat, unpad(vals, mask)[0], sp, cu, n)
    g = h[rows]
    loss = genecompass_loss(model.mlm_logits(g), lab, model.value_prediction(g), lv)[0]
    model.zero_grad()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    gp = model.gene_rows_padded(model.forward_padded(ids, vals, sp, mask))
    loss_p = genecompass_loss(model.mlm_logits(gp), t["labels"], model.value_prediction(gp), t["labels_values"])[0]
    loss_p.backward()
    torch.testing.assert_close(loss, t["loss"], **TOL)
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, atol=1e-4, rtol=1e-4, msg=k)
    model.zero_grad(set_to_none=True)
    # the prior-knowledge tables and the homolog index are frozen buffers, not parameters
    names = dict(model.named_parameters())
    assert not any(k.endswith(("_knowledge", "homologous_index")) for k in names)
    assert "bert.cls_embedding.weight" in names and "bert.embeddings.concat_embeddings.cat_fc.weight" in names
