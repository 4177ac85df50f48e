"""``scfm tokenize`` / ``scfm medians`` start without torch (its import costs 1.5-2.5 s); tokenizing imports
no pandas (~0.4 s, in every worker) and importing the tokenize path no tqdm either."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.resources import files

import pytest

pytest.importorskip("anndata")

_PROBE = """
import sys
from scfm_fast.cli import main
rc = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "numba", "transformers", "datasets", "anndata", "pandas") if m in sys.modules)
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
        if args[0] == "tokenize":
            assert "pandas" not in line, line


_WATCH_PANDAS = """
import os, sys, traceback

class Watch:  # logs every import of pandas, in this process and in forked workers
    def find_spec(self, name, path=None, target=None):
        if name == "pandas":
            with open(os.environ["PANDAS_LOG"], "a") as f:
                f.write(f"pid {os.getpid()}\\n" + "".join(traceback.format_stack()))

sys.meta_path.insert(0, Watch())
from scfm_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("extra", [["--workers", "2"], ["--keep-counts", "--chunk-size", "64"]],
                         ids=["workers", "keep-counts"])
def test_tokenizing_never_imports_pandas(tmp_path, extra):
    """Not at start-up, not in the workers; pyarrow's own numpy conversions would import it."""
    demo = str(files("scfm_fast") / "data/demo/pbmc_200cells.h5ad")
    log = tmp_path / "pandas.log"
    args = ["tokenize", demo, "--out", str(tmp_path / "t"), "--obs-columns", "n_genes", *extra]
    r = subprocess.run([sys.executable, "-c", _WATCH_PANDAS, *args], capture_output=True, text=True, cwd=tmp_path,
                       check=False, env={**os.environ, "PANDAS_LOG": str(log)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote 200 cells" in r.stderr + r.stdout
    assert not log.exists(), log.read_text()[-3000:]


def test_light_subcommands_skip_the_plugins():
    code = ("import sys; from scfm_fast.cli import build_parser; build_parser(command='tokenize'); "
            "import scfm_fast.tokenizer.pipeline, scfm_fast.readers, scfm_fast.store.writer; "
            "print(sorted(m for m in ('torch', 'numba', 'anndata', 'pandas', 'tqdm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


_BLAS_PROBE = """
import os, sys
from scfm_fast.cli import main
rc = main(sys.argv[1:])
print("BLAS", os.environ.get("OPENBLAS_NUM_THREADS"))
sys.exit(rc)
"""


@pytest.mark.parametrize(("preset", "expected"), [(None, "1"), ("3", "3")])
def test_tokenize_and_medians_give_openblas_one_thread_unless_the_user_chose(tmp_path, preset, expected):
    """Its idle threads spin on the cores the workers need; a user's own setting is kept."""
    demo = str(files("scfm_fast") / "data/demo/pbmc_200cells.h5ad")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if preset is not None:
        env["OPENBLAS_NUM_THREADS"] = preset
    r = subprocess.run([sys.executable, "-c", _BLAS_PROBE, "medians", demo, "--out", str(tmp_path / "m")],
                       capture_output=True, text=True, cwd=tmp_path, check=False, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == f"BLAS {expected}"


@pytest.mark.parametrize("env", [None, "0"])
def test_avx512_gather_follows_the_cpu_unless_turned_off(env):
    # on by default exactly where /proc/cpuinfo lists AVX-512 F/DQ/VL/BW; SCFM_FAST_SIMD=0 turns it off
    pytest.importorskip("scfm_fast._core")
    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    has_cpu = {"avx512f", "avx512dq", "avx512vl", "avx512bw"} <= flags
    run_env = {k: v for k, v in os.environ.items() if k != "SCFM_FAST_SIMD"}
    if env is not None:
        run_env["SCFM_FAST_SIMD"] = env
    probe = ("from scfm_fast import _core; a = _core.build_info()['avx512_gather']; "
             "b = _core.set_gather_simd(False); c = _core.build_info()['avx512_gather']; print(a, b, c)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=run_env, check=True)
    expected = "on" if has_cpu and env is None else "off"
    assert r.stdout.split() == [expected, "False", "off"]
