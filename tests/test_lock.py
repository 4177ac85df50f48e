"""One writer per output directory: the lock itself, a dead holder, and two tokenize runs on one --out."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from scfm_fast._errors import StoreError
from scfm_fast._lock import TOKENS_LOCK, OutputLock, output_lock
from scfm_fast.cli import main
from scfm_fast.store import TokenStore, read_manifest, read_table
from scfm_fast.tokenizer.pipeline import tokenize_corpus
from scfm_fast.vocab import GeneVocab
from tests._data import make_counts_adata

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.communicate()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("child never reached the pause point")
        time.sleep(0.02)


def test_second_holder_is_refused_with_pid_and_host(tmp_path):
    out = tmp_path / "o"
    with output_lock(out, command="embed"):
        info = json.loads((out / ".scfm.lock").read_text())
        assert info["pid"] == os.getpid() and info["command"] == "embed"
        # flock conflicts between two open file descriptions even within one process
        with pytest.raises(StoreError, match=rf"another scfm embed \(pid {os.getpid()} on "
                                             rf"{socket.gethostname()}\) is writing {out}"):
            OutputLock(out, command="embed").acquire()
    assert not out.exists()  # created for the run, left empty: removed with the lock
    with output_lock(out, command="embed"):  # released: the next run takes it
        pass


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    out = tmp_path / "o"
    code = textwrap.dedent(f"""
        import sys, time
        from scfm_fast._lock import OutputLock
        OutputLock({str(out)!r}, command="perturb").acquire()
        print("held", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=_env(), text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(StoreError, match=f"pid {proc.pid} on"):
            OutputLock(out, command="perturb").acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.loads((out / ".scfm.lock").read_text())["pid"] == proc.pid  # the stale file is still there
    with output_lock(out, command="perturb"):
        assert json.loads((out / ".scfm.lock").read_text())["pid"] == os.getpid()


_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from scfm_fast.store import writer as w
    from scfm_fast.tokenizer.pipeline import tokenize_corpus

    src, out, stage, signal_file, go_file = sys.argv[1:6]

    def pause():
        Path(signal_file).write_text("paused")
        while not Path(go_file).exists():
            time.sleep(0.02)

    init, write, assemble = w.ShardedTokenWriter.__init__, w.ShardedTokenWriter.write_shard, \\
        w.ShardedTokenWriter._assemble
    n = [0]

    def patched_init(self, *a, **k):
        if stage == "start":
            pause()
        init(self, *a, **k)

    def patched_write(self, *a, **k):
        write(self, *a, **k)
        n[0] += 1
        if stage == "shard" and n[0] == 2:
            pause()

    def patched_assemble(self, *a, **k):
        if stage == "finalize":
            pause()
        assemble(self, *a, **k)

    w.ShardedTokenWriter.__init__ = patched_init
    w.ShardedTokenWriter.write_shard = patched_write
    w.ShardedTokenWriter._assemble = patched_assemble
    tokenize_corpus(src, out, chunk_size=10, max_len=2048, progress_bar=False, n_threads=1)
""")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("lock_src")
    make_counts_adata(GeneVocab.load(), n_cells=45, n_genes=70).write_h5ad(d / "c.h5ad")
    ref = d / "ref"
    tokenize_corpus(d / "c.h5ad", ref, chunk_size=10, progress_bar=False, n_threads=1)
    return d / "c.h5ad", ref


@pytest.mark.parametrize("stage", ["start", "shard", "finalize"])
def test_concurrent_tokenize_on_one_out(tmp_path, source, stage, capsys):
    src, ref = source
    out, sig, go = tmp_path / "o", tmp_path / "paused", tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(src), str(out), stage, str(sig), str(go)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(sig, proc)
        # a retried job with other options, and a user's --resume: both refused while the first runs
        for extra in (["--overwrite", "--max-len", "16"], ["--resume"]):
            rc = main(["tokenize", str(src), "--out", str(out), "--chunk-size", "10", *extra])
            err = capsys.readouterr().err
            assert rc == 2, err
            assert f"another scfm tokenize (pid {proc.pid} on {socket.gethostname()}) is writing {out}" in err
        go.write_text("go")
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
    # the first run completed, untouched by the refused ones: equal to a run on its own
    assert read_manifest(out)["n_cells"] == read_manifest(ref)["n_cells"]
    assert read_table(out).column("input_ids").equals(read_table(ref).column("input_ids"))
    a, b = TokenStore(out), TokenStore(ref)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.offsets), np.asarray(b.offsets))
    assert not (out / TOKENS_LOCK).exists()  # released at the end of the run
    # and the lock is free again: --resume of the complete dataset has nothing to do
    assert main(["tokenize", str(src), "--out", str(out), "--chunk-size", "10", "--resume"]) == 0


@pytest.mark.parametrize("argv", [
    ["medians", "in.h5ad"],
    ["embed", "tokens", "--model", "model"],
    ["perturb", "tokens", "--model", "model"],
], ids=["medians", "embed", "perturb"])
def test_every_writing_command_takes_the_lock(tmp_path, argv, capsys):
    out = tmp_path / "o"
    with output_lock(out, command=argv[0]):
        assert main([*argv, "--out", str(out)]) == 2  # refused before the command reads anything
    err = capsys.readouterr().err
    assert f"scfm {argv[0]}: error: another scfm {argv[0]} (pid {os.getpid()} on" in err and str(out) in err


def test_out_that_is_a_file_is_refused_clearly(tmp_path, source):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="is a file; --out must be a directory"):
        tokenize_corpus(source[0], tmp_path / "f", progress_bar=False)
    assert (tmp_path / "f").read_text() == "x"
