"""One encoder implementation: attention and LayerNorm maths live in ``scfm_fast/model`` and
``scfm_fast/kernels`` only. A second encoder elsewhere (a private attention, a copied layer) fails here."""

from __future__ import annotations

import re
from pathlib import Path

import scfm_fast

PKG = Path(scfm_fast.__file__).resolve().parent
ALLOWED = ("model", "kernels")
# what an encoder copy needs: attention (SDPA, a softmax over scores, flash-attn) or the LayerNorm
# (log_softmax, as in a cross-entropy, is not attention)
ENCODER_MATHS = re.compile(r"scaled_dot_product_attention|(?<!log_)softmax\(|layer_norm\(|flash_attn_\w+\(")
# Known copies awaiting a move into scfm_fast/model or scfm_fast/kernels (none left: the list can only shrink)
PENDING: dict[str, str] = {}


def _offences() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if rel.split("/", 1)[0] in ALLOWED:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if ENCODER_MATHS.search(code) and not code.lstrip().startswith(("\"", "'", "``")):
                found.setdefault(rel, []).append(f"{n}: {line.strip()}")
    return found


def test_no_second_encoder_outside_model_and_kernels():
    unexpected = {f: lines for f, lines in _offences().items() if f not in PENDING}
    assert not unexpected, (
        "encoder maths outside scfm_fast/model and scfm_fast/kernels (use model.layers.EncoderParams or "
        f"kernels.attention): {unexpected}")


def test_the_scan_sees_encoder_maths(tmp_path):
    # the pattern catches what a copy would contain, and leaves a cross-entropy alone
    for hit in ("F.scaled_dot_product_attention(q, k, v)", "p = torch.softmax(s, -1)", "s.softmax(-1)",
                "F.layer_norm(x, (h,), w, b)", "flash_attn_varlen_func(q, k, v)"):
        assert ENCODER_MATHS.search(hit), hit
    for miss in ("F.log_softmax(logits, -1)", "torch.logsumexp(logits, -1)", 'import_module("flash_attn")'):
        assert not ENCODER_MATHS.search(miss), miss
