"""Chunked linear + CE against F.cross_entropy; MLM loss/grad parity with transformers.BertForMaskedLM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scfm_fast.model.bert import BertEncoderModel
from scfm_fast.model.config import EncoderConfig
from scfm_fast.model.heads import MLMHead
from scfm_fast.pretrain.data import make_batch
from scfm_fast.pretrain.masking import Masker
from scfm_fast.pretrain.objectives import linear_cross_entropy, mlm_loss_sum


def test_chunked_linear_ce_matches_cross_entropy():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(101, 16, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(101, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 101, (37,), generator=g)
    loss, correct = linear_cross_entropy(h, w, b, y, chunk=5)  # 8 chunks, the last one partial
    (loss * 0.7).backward()
    grads = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    logits = h @ w.T + b
    ref = F.cross_entropy(logits, y, reduction="sum")
    (ref * 0.7).backward()
    assert torch.allclose(loss, ref, rtol=1e-12)
    assert int(correct) == int((logits.argmax(-1) == y).sum())
    for got, t in zip(grads, (h, w, b)):
        torch.testing.assert_close(got, t.grad, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # evaluation: no gradients computed in the forward pass, the same sums
        loss_ng, correct_ng = linear_cross_entropy(h, w, b, y, chunk=5)
    assert float(loss_ng) == float(loss) and int(correct_ng) == int(correct)


class _Cells:
    """A stand-in corpus: ``make_batch`` only needs ``tokens`` and ``len``."""

    def __init__(self, cells):
        self.cells = cells

    def __len__(self):
        return len(self.cells)

    def tokens(self, i):
        return self.cells[i]


SHAPES = {
    "v1-relu": dict(hidden_act="relu", specials={"<pad>": 0, "<mask>": 1}),
    "mouse-silu": dict(hidden_act="silu", specials={"<pad>": 0, "<mask>": 1}),
    "v2-cls-eos": dict(hidden_act="relu", specials={"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_mlm_loss_and_grads_match_hf_bert_for_masked_lm(shape):
    transformers = pytest.importorskip("transformers")
    spec = SHAPES[shape]
    V = 211
    cfg = EncoderConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, hidden_act=spec["hidden_act"], max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(**cfg.to_hf_dict(), attn_implementation="eager"))
    hf.train()
    ours = BertEncoderModel(cfg)
    ours.load_state_dict({k.removeprefix("bert."): v for k, v in hf.state_dict().items()
                          if k.startswith("bert.")}, strict=True)
    ours.train()
    head = MLMHead(cfg, tied_to=ours.embeddings.word_embeddings)
    head.load_state_dict({k.removeprefix("cls.predictions."): v for k, v in hf.state_dict().items()
                          if k.startswith("cls.predictions.") and "decoder.bias" not in k}, strict=True)

    rng = np.random.default_rng(1)
    n_special = len(spec["specials"])
    cells = []
    for n in (17, 40, 5, 33):
        genes = rng.choice(np.arange(n_special, V), size=n, replace=False)
        cells.append(np.concatenate([[2], genes, [3]]) if "<cls>" in spec["specials"] else genes)
    masker = Masker(vocab_size=V, mask_id=1, protected=(0, 1), prob=0.3, seed=5)
    batch = make_batch(_Cells(cells), masker, np.arange(len(cells)), epoch=0)
    n_sel = batch.labels.numel()
    assert n_sel > 10

    loss_sum, _ = mlm_loss_sum(ours, head, batch, chunk=7)
    (loss_sum / n_sel).backward()

    # the same corrupted cells, padded, with labels -100 everywhere but the selected rows
    L = max(len(c) for c in cells)
    ids = torch.zeros(len(cells), L, dtype=torch.long)
    att = torch.zeros(len(cells), L, dtype=torch.long)
    lab = torch.full((len(cells), L), -100, dtype=torch.long)
    cu = batch.packed.cu_seqlens.tolist()
    flat_lab = torch.full((cu[-1],), -100, dtype=torch.long)
    flat_lab[batch.label_pos] = batch.labels
    for i in range(len(cells)):
        n = cu[i + 1] - cu[i]
        ids[i, :n] = batch.packed.input_ids[cu[i]:cu[i + 1]]
        att[i, :n] = 1
        lab[i, :n] = flat_lab[cu[i]:cu[i + 1]]
    out = hf(input_ids=ids, attention_mask=att, labels=lab)
    out.loss.backward()

    assert abs(float(loss_sum.detach()) / n_sel - float(out.loss.detach())) / float(out.loss.detach()) <= 1e-6
    theirs = dict(hf.named_parameters())
    mine = {f"bert.{k}": p for k, p in ours.named_parameters()}
    # the tied decoder weight is the word embedding matrix (checked under its bert.* name)
    assert head.decoder.weight is ours.embeddings.word_embeddings.weight
    mine.update({f"cls.predictions.{k}": p for k, p in head.named_parameters() if k != "decoder.weight"})
    # attention key biases have an analytically zero gradient (softmax ignores a per-query constant): both
    # sides hold float noise (~1e-12) there, which depends on the order of the head's float operations, so
    # their difference must stay below 1e-9 x the model's largest gradient (100x under float32 epsilon);
    # every other gradient is compared relative to its own size (floor 1e-6 x the largest)
    top = max(float(q.grad.abs().max()) for q in theirs.values() if q.grad is not None)
    checked = 0
    for name, p in mine.items():
        q = theirs[name]
        floor = (1e-4 if name.endswith("attention.self.key.bias") else 1e-6) * top
        scale = max(float(q.grad.abs().max()), floor)
        assert float((p.grad - q.grad).abs().max()) / scale <= 1e-5, name
        checked += 1
    assert checked == len(mine) and checked >= 30


@pytest.mark.parametrize("what", ["loss", "grads"])
def test_bf16_error_is_within_twice_hf_bf16_error(what):
    """bf16 autocast: our loss and gradients are as close to float32 as HF's own bf16 run is (within 2x)."""
    transformers = pytest.importorskip("transformers")
    V = 211
    cfg = EncoderConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, hidden_act="relu", max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(**cfg.to_hf_dict(), attn_implementation="eager"))
    ours = BertEncoderModel(cfg)
    ours.load_state_dict({k.removeprefix("bert."): v for k, v in hf.state_dict().items() if k.startswith("bert.")})
    head = MLMHead(cfg, tied_to=ours.embeddings.word_embeddings)
    head.load_state_dict({k.removeprefix("cls.predictions."): v for k, v in hf.state_dict().items()
                          if k.startswith("cls.predictions.") and "decoder.bias" not in k})
    rng = np.random.default_rng(1)
    cells = [rng.choice(np.arange(2, V), size=n, replace=False) for n in (17, 40, 5, 33, 60)]
    batch = make_batch(_Cells(cells), Masker(vocab_size=V, mask_id=1, protected=(0, 1), seed=5), np.arange(5),
                       epoch=0)
    n_sel = batch.labels.numel()
    cu = batch.packed.cu_seqlens.tolist()
    L = max(len(c) for c in cells)
    ids = torch.zeros(len(cells), L, dtype=torch.long)
    att = torch.zeros_like(ids)
    lab = torch.full_like(ids, -100)
    flat = torch.full((cu[-1],), -100, dtype=torch.long)
    flat[batch.label_pos] = batch.labels
    for i in range(len(cells)):
        n = cu[i + 1] - cu[i]
        ids[i, :n], att[i, :n], lab[i, :n] = batch.packed.input_ids[cu[i]:cu[i + 1]], 1, flat[cu[i]:cu[i + 1]]

    def run_ours(bf16):
        ours.zero_grad()
        head.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            ls, _ = mlm_loss_sum(ours, head, batch)
        (ls / n_sel).backward()
        return float(ls.detach()) / n_sel, torch.cat([p.grad.flatten() for p in ours.parameters()])

    def run_hf(bf16):
        hf.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = hf(input_ids=ids, attention_mask=att, labels=lab).loss
        loss.backward()
        return float(loss.detach()), torch.cat([hf.bert.get_parameter(k).grad.flatten()
                                                for k, _ in ours.named_parameters()])

    (l32, g32), (l16, g16) = run_ours(False), run_ours(True)
    (h32, hg32), (h16, hg16) = run_hf(False), run_hf(True)
    assert abs(l32 - h32) / h32 <= 1e-6
    ours_err, hf_err = abs(l16 - l32), abs(h16 - h32)
    if what == "loss":
        assert ours_err <= 2 * hf_err + 1e-3 * abs(l32), (ours_err, hf_err)
        return
    gerr, hgerr = float((g16 - g32).norm() / g32.norm()), float((hg16 - hg32).norm() / hg32.norm())
    assert gerr <= 2 * hgerr, (gerr, hgerr)
