"""``scfm tokenize`` / ``scfm medians`` start without torch (its import costs 1.5-2.5 s)."""

from __future__ import annotations

import subprocess
import sys
from importlib.resources import files

import pytest

pytest.importorskip("anndata")

_PROBE = """
import sys
from scfm_fast.cli import main
rc = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "numba", "transformers", "datasets", "anndata") if m in sys.modules)
print("HEAVY", heavy)
sys.exit(rc)
"""


def _run(args, cwd):
    r = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, cwd=cwd, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def test_tokenize_and_medians_do_not_import_torch(tmp_path):
    demo = str(files("scfm_fast") / "data/demo/pbmc_200cells.h5ad")
    for args in (["tokenize", demo, "--out", str(tmp_path / "t"), "--chunk-size", "64"],
                 ["medians", demo, "--out", str(tmp_path / "m")]):
        line = _run(args, tmp_path)
        assert line.startswith("HEAVY [")
        assert "torch" not in line and "transformers" not in line and "datasets" not in line, (args[0], line)


def test_light_subcommands_skip_the_plugins():
    code = ("import sys; from scfm_fast.cli import build_parser; build_parser(command='tokenize'); "
            "import scfm_fast.tokenizer.pipeline, scfm_fast.readers, scfm_fast.store.writer; "
            "print(sorted(m for m in ('torch', 'numba', 'anndata') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
