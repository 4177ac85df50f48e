"""GeneCompass's pretraining objective on the trainer: its masking (values -1 at masked and randomised
positions), the loss against GeneCompass's own ``mlm_loss`` case and a plain PyTorch implementation (values
and gradients), and a short ``scfm pretrain`` run on real cells that lowers both terms and saves
GeneCompass-layout checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scfm_fast._errors import UsageError
from scfm_fast.loader import pack_cells
from scfm_fast.model.genecompass_checkpoint import load_genecompass
from scfm_fast.pretrain.data import MaskedBatch
from scfm_fast.pretrain.masking import Masker
from scfm_fast.pretrain.objectives import GeneCompassObjective, genecompass_loss, genecompass_loss_sums
from tests._genecompass import fixture_path


@pytest.fixture(scope="module")
def fixture_dir(shared_dir):
    return fixture_path(shared_dir)


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
    np.testing.assert_allclose(float(loss.detach()), float(ref.detach()), rtol=1e-5, atol=1e-6)
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
    np.testing.assert_allclose(float(ls.detach()) / n, float(ref.detach()), rtol=1e-5)
    assert int(c) == int(correct)
    logged = obj.flush()
    np.testing.assert_allclose([logged["id_loss"], logged["value_loss"]], [float(ref_ce.detach()), float(ref_mse.detach())], rtol=1e-5)


@pytest.fixture(scope="module")
def gc_run_inputs(tmp_path_factory, pbmc_path):
    """Real PBMC cells + synthetic mouse cells tokenized with --preset genecompass, a joint dictionary, four
    knowledge pickles (gene id -> 8-d vector) and a small GeneCompass config."""
    import json
    import pickle

    from scfm_fast.tokenizer.pipeline import tokenize_corpus
    from tests._genecompass import human_mouse_inputs, joint_dictionaries

    tmp = tmp_path_factory.mktemp("gcpre")
    hp, mp, human_ids, mouse_ids = human_mouse_inputs(tmp, pbmc_path, n_mouse=40)
    tok, med = joint_dictionaries(tmp, human_ids, mouse_ids)
    data = tmp / "tokens"
    tokenize_corpus([hp, mp], data, preset="genecompass", token_dictionary=tok, gene_median=med,
                    species_column="organism", max_len=64, progress_bar=False)
    rng = np.random.default_rng(0)
    genes = sorted(set(human_ids) | set(mouse_ids))
    knowledge = {}
    for name in ("promoter", "co_exp", "gene_family", "peca_grn"):
        knowledge[name] = str(tmp / f"{name}.pkl")
        with open(knowledge[name], "wb") as f:
            pickle.dump({g: rng.normal(size=8).astype(np.float32) for g in genes}, f)
    cfg = tmp / "gc_config.json"
    cfg.write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "intermediate_size": 64, "hidden_act": "gelu", "max_position_embeddings": 64,
                               "use_values": True, "use_promoter": True, "use_co_exp": True,
                               "use_gene_family": True, "use_peca_grn": True, "use_cls_token": True}))
    return data, tok, knowledge, cfg


def test_short_run_lowers_both_terms_and_saves_genecompass_layout(gc_run_inputs, tmp_path, fixture_dir):
    import json

    from scfm_fast.pretrain import pretrain_model

    data, tok, knowledge, cfg = gc_run_inputs
    kn = ",".join(f"{k}={v}" for k, v in knowledge.items())
    res = pretrain_model([data], out=tmp_path / "run", config=str(cfg), token_dictionary=str(tok), knowledge=kn,
                         max_steps=24, batch_tokens=1024, lr=3e-3, warmup=0, dtype="float32", log_every=1,
                         save_every=12, eval_fraction=0.1, eval_every=12, progress=False)
    assert res["status"] == "complete" and res["step"] == 24 and np.isfinite(res["eval_loss"])
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "id_loss" in r]
    assert len(recs) == 24
    for key in ("id_loss", "value_loss"):  # measured: -12% and -23% (first vs last 6 steps)
        first, last = np.mean([r[key] for r in recs[:6]]), np.mean([r[key] for r in recs[-6:]])
        assert last < 0.95 * first, (key, first, last)
    for r in recs:  # the logged loss is GeneCompass's weighting of the two terms
        np.testing.assert_allclose(r["loss"], 0.2 * r["id_loss"] + 0.8 * r["value_loss"], rtol=1e-6)
    ckpt = tmp_path / "run" / "checkpoint-24"
    # GeneCompass's layout: the same state-dict keys (and config switches) as a checkpoint its code saved
    sd = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    ref = torch.load(fixture_dir / "model" / "pytorch_model.bin", weights_only=True)
    assert set(sd) == set(ref)
    conf = json.loads((ckpt / "config.json").read_text())
    assert all(conf[k] is True for k in ("use_values", "use_promoter", "use_cls_token"))
    model = load_genecompass(ckpt)
    with open(knowledge["promoter"], "rb") as f:
        prom = pickle_load(f)
    with open(tok, "rb") as f:
        token_of = pickle_load(f)
    g = next(iter(prom))
    np.testing.assert_array_equal(model.bert.embeddings.promoter_knowledge[token_of[g]].numpy(), prom[g])
    # continue from it with --init (knowledge tables come with the checkpoint), in bf16 autocast this time
    res2 = pretrain_model([data], out=tmp_path / "run2", init=str(ckpt), token_dictionary=str(tok), max_steps=2,
                          batch_tokens=2048, dtype="bfloat16", progress=False)
    assert np.isfinite(res2["loss"])
    assert res2["status"] == "complete"
    again = load_genecompass(tmp_path / "run2" / "checkpoint-2")
    torch.testing.assert_close(again.bert.embeddings.promoter_knowledge, model.bert.embeddings.promoter_knowledge)


def pickle_load(f):
    import pickle

    return pickle.load(f)  # noqa: S301 - test files written above


def test_family_and_knowledge_refusals(gc_run_inputs, tmp_path):
    from scfm_fast._errors import UsageError
    from scfm_fast.pretrain import pretrain_model

    data, tok, knowledge, cfg = gc_run_inputs
    with pytest.raises(UsageError, match="GeneCompass tokens.*geneformer-v1-6l is a Geneformer"):
        pretrain_model([data], out=tmp_path / "a", preset="geneformer-v1-6l", token_dictionary=str(tok), max_steps=1,
                       progress=False)
    three = ",".join(f"{k}={v}" for k, v in list(knowledge.items())[:3])
    with pytest.raises(UsageError, match="missing \\['peca_grn'\\]"):
        pretrain_model([data], out=tmp_path / "b", config=str(cfg), token_dictionary=str(tok), knowledge=three,
                       max_steps=1, progress=False)
    with pytest.raises(UsageError, match="NAME=PKL"):
        pretrain_model([data], out=tmp_path / "c", config=str(cfg), token_dictionary=str(tok), knowledge="x=y",
                       max_steps=1, progress=False)


def test_cli_from_scratch_with_species_files_and_homologs(gc_run_inputs, tmp_path):
    """``scfm pretrain --knowledge NAME_human=,NAME_mouse=,id2name= --homologs TSV`` from scratch: the saved
    checkpoint holds the homolog remap and the tables read through the symbols; --init refuses both options."""
    import pickle

    from scfm_fast.cli import main as cli_main
    from scfm_fast.pretrain import pretrain_model

    data, tok, _, cfg = gc_run_inputs
    with open(tok, "rb") as f:
        token_of = pickle_load(f)
    human = [g for g in token_of if g.startswith("ENSG")]
    mouse = [g for g in token_of if g.startswith("ENSMUSG")]
    id2name = {g: f"SYM{i}" for i, g in enumerate(human + mouse)}
    rng = np.random.default_rng(1)
    parts = [f"id2name={tmp_path / 'id2name.pkl'}"]
    tables = {}
    for name in ("promoter", "co_exp", "gene_family", "peca_grn"):
        for sp, genes in (("human", human), ("mouse", mouse)):
            tables[name, sp] = {id2name[g]: rng.normal(size=8).astype(np.float32) for g in genes}
            with open(tmp_path / f"{name}_{sp}.pkl", "wb") as f:
                pickle.dump(tables[name, sp], f)
            parts.append(f"{name}_{sp}={tmp_path / f'{name}_{sp}.pkl'}")
    with open(tmp_path / "id2name.pkl", "wb") as f:
        pickle.dump(id2name, f)
    pairs = list(zip(human[:12], mouse[:12]))
    (tmp_path / "homologs.tsv").write_text("human\tmouse\n" + "".join(f"{h}\t{m}\n" for h, m in pairs))
    out = tmp_path / "run"
    rc = cli_main(["pretrain", str(data), "--out", str(out), "--config", str(cfg), "--token-dictionary", str(tok),
                   "--knowledge", ",".join(parts), "--homologs", str(tmp_path / "homologs.tsv"), "--max-steps", "1",
                   "--batch-tokens", "1024", "--dtype", "float32", "--save-every", "1"])
    assert rc == 0
    emb = load_genecompass(out / "checkpoint-1").bert.embeddings
    want = np.arange(len(token_of))
    for h, m in pairs:
        want[token_of[m]] = token_of[h]
    np.testing.assert_array_equal(emb.homologous_index.numpy(), want)
    g = mouse[3]
    np.testing.assert_array_equal(emb.gene_family_knowledge[token_of[g]].numpy(), tables["gene_family", "mouse"][id2name[g]])
    with pytest.raises(UsageError, match="--homologs build the knowledge tables / homolog remap"):
        pretrain_model([data], out=tmp_path / "r2", init=str(out / "checkpoint-1"), token_dictionary=str(tok),
                       homologs=str(tmp_path / "homologs.tsv"), max_steps=1, progress=False)


def test_genecompass_base_preset():
    from scfm_fast.pretrain.build import model_config
    from scfm_fast.pretrain.presets import PretrainOptions

    o = PretrainOptions(out="-", preset="genecompass-base").resolved()
    cfg = model_config(o, vocab_size=50558, specials={"<pad>": 0, "<mask>": 1})
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (12, 768, 12, 3072)
    assert cfg.hidden_act == "gelu" and cfg.max_position_embeddings == 2048 and cfg.vocab_size == 50558
    assert (o.lr, o.schedule, o.warmup, o.weight_decay) == (5e-5, "linear", 10_000, 0.01)
