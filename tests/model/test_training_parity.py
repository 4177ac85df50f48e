"""Training through the shared layers: loss and gradients of the varlen path + MLMHead equal
``transformers.BertForMaskedLM`` on the same cells padded; dropout sits where HF BERT puts it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scfm_fast.kernels.padding import cu_seqlens_from_lengths
from scfm_fast.model.bert import BertEncoderModel
from scfm_fast.model.heads import MLMHead
from tests._helpers import init_like_bert, tiny_config

transformers = pytest.importorskip("transformers")
LENGTHS = [1, 13, 40, 2, 31]


@pytest.fixture(autouse=True)
def _torch_row_ops(monkeypatch):
    """Plain PyTorch row ops (the Triton interpreter is slow); the parity test also runs the kernels."""
    monkeypatch.setenv("SCFM_FAST_TRITON", "0")


def _cells(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    cells = [torch.randint(2, vocab, (n,), generator=g) for n in lengths]
    padded = torch.zeros(len(cells), max(lengths), dtype=torch.long)
    for i, c in enumerate(cells):
        padded[i, :c.numel()] = c
    sel = torch.rand(padded.shape, generator=g) < 0.3
    sel &= padded != 0
    sel[2, 0] = True  # at least one selected row
    labels = torch.randint(2, vocab, padded.shape, generator=g)
    return torch.cat(cells), cu_seqlens_from_lengths(torch.tensor(lengths)), max(lengths), padded, sel, labels


def _models(act, *, tied=True, dropout=0.0):
    cfg = tiny_config(act=act)
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = dropout
    cfg.tie_word_embeddings = tied
    enc = init_like_bert(BertEncoderModel(cfg), std=0.1)
    head = MLMHead(cfg, tied_to=enc.embeddings.word_embeddings.weight if tied else None)
    init_like_bert(head, std=0.1, seed=1)
    hf_cfg = transformers.BertConfig(**cfg.to_hf_dict(), attn_implementation="eager")
    hf = transformers.BertForMaskedLM(hf_cfg)
    missing, unexpected = hf.bert.load_state_dict(enc.state_dict(), strict=False)
    assert not unexpected and all("pooler" in k for k in missing)
    missing, unexpected = hf.load_state_dict(head.hf_state_dict(), strict=False)  # our writer's names
    assert not unexpected
    if not tied:  # HF ties by default; an untied checkpoint keeps its own decoder
        assert hf.cls.predictions.decoder.weight.data_ptr() != hf.bert.embeddings.word_embeddings.weight.data_ptr()
    return enc, head, hf


def _grads(named):
    return {k: p.grad.clone() for k, p in named if p.grad is not None}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# V1, mouse-Geneformer and V2 activations; the fused kernels' backward (interpreted on the CPU) once
@pytest.mark.parametrize(("act", "kernels"), [("relu", "torch"), ("silu", "torch"), ("gelu", "torch"),
                                              ("gelu", "triton")])
def test_varlen_loss_and_gradients_equal_hf_masked_lm_fp32(act, kernels, monkeypatch):
    monkeypatch.setenv("SCFM_FAST_TRITON", "1" if kernels == "triton" else "0")
    enc, head, hf = _models(act)
    ids, cu, m, padded, sel, labels = _cells(LENGTHS, enc.config.vocab_size)
    enc.train(), head.train(), hf.train()  # dropout probabilities are 0: train mode must still be exact
    # ours: packed cells, the head on the selected rows only
    h = enc.forward_varlen(ids, cu, m)
    keep = (padded != 0).flatten()
    rows = sel.flatten()[keep]
    loss = F.cross_entropy(head(h, rows=rows), labels.flatten()[keep][rows])
    loss.backward()
    # transformers: padded batch, every position decoded, unselected labels ignored
    hf_labels = labels.masked_fill(~sel, -100)
    hf_loss = hf(input_ids=padded, attention_mask=(padded != 0).long(), labels=hf_labels).loss
    hf_loss.backward()
    assert abs(loss.item() - hf_loss.item()) <= 1e-6 * abs(hf_loss.item())
    ours = {**{f"bert.{k}": g for k, g in _grads(enc.named_parameters()).items()},
            **{f"cls.predictions.{k}": g for k, g in _grads(head.named_parameters()).items()}}
    theirs = _grads(hf.named_parameters())
    assert set(theirs) <= set(ours)
    scale = max(g.abs().max() for g in theirs.values())
    for k, g in theirs.items():
        if k.endswith("attention.self.key.bias"):
            # softmax ignores a shift shared by all keys: this gradient is 0 exactly, so both are noise
            assert ours[k].abs().max() <= 1e-7 * scale and g.abs().max() <= 1e-7 * scale
            continue
        assert _rel(ours[k], g) <= 1e-5, k


def test_untied_decoder_gradients_equal_hf():
    enc, head, hf = _models("relu", tied=False)
    ids, cu, m, padded, sel, labels = _cells(LENGTHS, enc.config.vocab_size, seed=3)
    keep = (padded != 0).flatten()
    rows = sel.flatten()[keep]
    F.cross_entropy(head(enc.forward_varlen(ids, cu, m), rows=rows), labels.flatten()[keep][rows]).backward()
    hf(input_ids=padded, attention_mask=(padded != 0).long(), labels=labels.masked_fill(~sel, -100)).loss.backward()
    assert _rel(head.decoder.weight.grad, hf.cls.predictions.decoder.weight.grad) <= 1e-5
    assert _rel(enc.embeddings.word_embeddings.weight.grad, hf.bert.embeddings.word_embeddings.weight.grad) <= 1e-5


def test_dropout_placement_equals_hf_bert_in_train_mode():
    # the padded path draws its dropout masks in HF eager BERT's order and shapes (embeddings after the
    # LayerNorm; attention probabilities; after the attention output dense; after the FFN output dense),
    # so from one seed both give the same outputs
    enc, _, hf = _models("gelu", dropout=0.2)
    _, _, _, padded, _, _ = _cells(LENGTHS, enc.config.vocab_size)
    mask = padded != 0
    enc.train(), hf.train()
    torch.manual_seed(7)
    ours = enc.forward_padded(padded, mask)
    torch.manual_seed(7)
    theirs = hf.bert(input_ids=padded, attention_mask=mask.long()).last_hidden_state
    assert (ours - theirs)[mask].abs().max() <= 1e-5
    torch.manual_seed(8)
    assert (enc.forward_padded(padded, mask) - theirs)[mask].abs().max() > 1e-2  # masks do change outputs


def test_dropout_only_in_train_mode_varlen():
    enc, _, _ = _models("relu", dropout=0.3)
    ids, cu, m, *_ = _cells(LENGTHS, enc.config.vocab_size)
    enc.eval()
    with torch.no_grad():
        ev = enc.forward_varlen(ids, cu, m)
        plain, _, _ = _models("relu", dropout=0.0)
        assert torch.equal(ev, plain.eval().forward_varlen(ids, cu, m))  # eval ignores the probabilities
    enc.train()
    tr = enc.forward_varlen(ids, cu, m)
    assert (tr - ev).abs().max() > 1e-2
    tr.sum().backward()
    assert enc.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    enc, _, _ = _models("silu", dropout=0.1)
    ids, cu, m, *_ = _cells(LENGTHS, enc.config.vocab_size)
    enc.train()
    grads = []
    for ckpt in (False, True):
        enc.zero_grad()
        torch.manual_seed(0)
        enc.forward_varlen(ids, cu, m, grad_checkpointing=ckpt).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in enc.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_training_loss_within_twice_hf_bf16_error():
    enc, head, hf = _models("relu")
    ids, cu, m, padded, sel, labels = _cells(LENGTHS, enc.config.vocab_size)
    keep = (padded != 0).flatten()
    rows = sel.flatten()[keep]
    hf_labels = labels.masked_fill(~sel, -100)

    def ours():
        return F.cross_entropy(head(enc.forward_varlen(ids, cu, m), rows=rows).float(), labels.flatten()[keep][rows])

    def theirs():
        return hf(input_ids=padded, attention_mask=(padded != 0).long(), labels=hf_labels).loss.float()

    with torch.no_grad():
        ref = theirs().item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            base, fast = theirs().item(), ours().item()
    assert abs(fast - ref) <= 2 * abs(base - ref) + 1e-6
