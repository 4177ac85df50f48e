"""``scfm info``: the tokenizer part never imports torch; the model part imports it when asked for."""

from __future__ import annotations

import subprocess
import sys

import pytest

_PROBE = """
import sys
from scfm_fast.cli import main
rc = main(sys.argv[1:])
print("TORCH", "torch" in sys.modules)
sys.exit(rc)
"""


def _run(*args):
    r = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_tokenizer_part_does_not_import_torch():
    out = _run("info", "--part", "tokenizer")
    assert "tokenizer backends" in out and "cpp" in out and "numpy" in out
    assert "attention backends" not in out
    assert out.strip().splitlines()[-1] == "TORCH False"


def test_model_part_and_whole_report_import_torch_lazily():
    out = _run("info", "--part", "model")
    assert "attention backends" in out and "torch" in out and "tokenizer backends" not in out
    assert out.strip().splitlines()[-1] == "TORCH True"
    out = _run("info")
    assert "tokenizer backends" in out and "attention backends" in out
    # the report module itself starts without torch: only the model part imports it
    code = "import sys, scfm_fast.info as i; i.info_dict(parts=('tokenizer',)); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


def test_bad_part_refused():
    from scfm_fast.info import info_dict

    with pytest.raises(ValueError, match="use one or both"):
        info_dict(parts=("gpu",))
