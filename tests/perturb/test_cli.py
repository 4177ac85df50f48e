"""``scfm perturb``: Parquet shards, manifest, merge, resume without duplicates, rank split, stats."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scfm_fast.perturb import perturb_cells
from scfm_fast.perturb._cli import parse_genes

from .conftest import CLS, EOS, SPECIAL, finish_token_dir, make_cells, run_cli, tiny_model


@pytest.fixture(scope="module")
def cells():
    return make_cells([6, 9, 4, 12, 7, 10, 5], seed=5)


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory, cells):
    d = tmp_path_factory.mktemp("tokens")
    for f, rows in enumerate([range(0, 4), range(4, 7)]):
        t = pa.table({"input_ids": pa.array([cells[i].tolist() for i in rows], pa.list_(pa.int32())),
                      "length": pa.array([len(cells[i]) for i in rows], pa.int32()),
                      "cell_index": pa.array([10 + i for i in rows], pa.int64())})
        pq.write_table(t, d / f"part-{f:04d}-000000000000.parquet")
    return finish_token_dir(d)


def _run(token_dir, ckpt, out, *extra):
    return run_cli(token_dir, ckpt, out, *extra)


def _assert_equals_one_process(df, cells, **kw):
    """The merged table holds exactly the rows of one in-process run over all cells, same values."""
    expect = perturb_cells(cells, tiny_model(), special_token_ids=SPECIAL, **kw)
    expect["cell_index"] += 10
    key = ["cell_index", "orig_rank", "gene_token"]
    got = df.sort_values(key).reset_index(drop=True)
    expect = expect.sort_values(key).reset_index(drop=True)
    assert got[key].equals(expect[key])
    np.testing.assert_allclose(got["cos_sim"], expect["cos_sim"], rtol=0, atol=1e-6)


def test_screen_writes_shards_merge_stats(token_dir, ckpt, tmp_path, cells):
    out = tmp_path / "out"
    assert _run(token_dir, ckpt, out) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "complete" and man["n_shards"] == 3
    assert sorted(p.name for p in (out / "shards").glob("*.parquet")) == [
        f"part-{s:06d}.parquet" for s in range(3)]
    assert man["config"]["layer"] == -2  # no --layer: Geneformer's own readout, the one recorded
    df = pd.read_parquet(out / "perturbations.parquet")
    expect = perturb_cells(cells, tiny_model(), special_token_ids=SPECIAL, layer=-2)
    assert len(df) == len(expect) == sum(len(c) for c in cells)
    np.testing.assert_allclose(df["cos_sim"], expect["cos_sim"], rtol=0, atol=1e-6)
    assert df["cell_index"].unique().tolist() == [10 + i for i in range(7)]
    st = pd.read_parquet(out / "gene_stats.parquet")
    assert {"gene_token", "mean_shift", "pvalue", "fdr", "rank"} <= set(st.columns)
    assert (out / "gene_stats.png").read_bytes()[:4] == b"\x89PNG"
    assert man["summary"]["n_rows"] == len(df)


def test_resume_skips_finished_shards_without_duplicates(token_dir, ckpt, tmp_path):
    out = tmp_path / "out"
    assert _run(token_dir, ckpt, out) == 0
    full = pd.read_parquet(out / "perturbations.parquet")
    shard0 = out / "shards" / "part-000000.parquet"
    t0 = shard0.stat().st_mtime_ns
    # an interrupted run: shard 1 missing, a half-written temporary left behind, no merged table
    (out / "shards" / "part-000001.parquet").unlink()
    (out / "shards" / ".part-000001.parquet.tmp").write_bytes(b"partial")
    (out / "perturbations.parquet").unlink()
    assert _run(token_dir, ckpt, out) == 2  # refuses to mix runs without --resume
    assert _run(token_dir, ckpt, out, "--resume") == 0
    assert shard0.stat().st_mtime_ns == t0
    again = pd.read_parquet(out / "perturbations.parquet")
    assert not again.duplicated(["cell_index", "gene_token"]).any()
    pd.testing.assert_frame_equal(again, full)


def test_resume_refuses_other_settings(token_dir, ckpt, tmp_path):
    out = tmp_path / "out"
    assert _run(token_dir, ckpt, out) == 0
    assert _run(token_dir, ckpt, out, "--resume", "--layer", "-1") == 2
    assert _run(token_dir, ckpt, out, "--overwrite", "--layer", "-1") == 0
    assert json.loads((out / "manifest.json").read_text())["config"]["layer"] == -1


def test_ranks_take_disjoint_shards_and_rank0_merges(token_dir, ckpt, tmp_path, monkeypatch, capsys, cells):
    # torchrun ranks, run one after the other: rank 0 prepares OUT (rank 1 waits for it) and merges once
    # every shard exists; here it gives up waiting at once, then merges on --resume
    out = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert _run(token_dir, ckpt, out, "--devices", "cpu", "--no-stats", "--merge-timeout", "0") == 2
    assert "never appeared" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "shards").glob("*.parquet")) == ["part-000000.parquet", "part-000002.parquet"]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert _run(token_dir, ckpt, out, "--devices", "cpu", "--no-stats") == 0
    assert (out / "shards" / "part-000001.parquet").exists() and not (out / "perturbations.parquet").exists()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert _run(token_dir, ckpt, out, "--devices", "cpu", "--no-stats", "--resume") == 0
    df = pd.read_parquet(out / "perturbations.parquet")
    assert not df.duplicated(["cell_index", "gene_token"]).any()
    _assert_equals_one_process(df, cells)


def test_gene_list_pairs_approx_and_skips(token_dir, ckpt, tmp_path, cells):
    out = tmp_path / "out"
    a, b, c = int(cells[1][0]), int(cells[1][3]), int(cells[3][2])
    assert _run(token_dir, ckpt, out, "--genes", f"{a},{b}+{c},{c}", "--perturb", "overexpress",
                "--mode", "approx", "--gene-shifts") == 0
    df = pd.read_parquet(out / "perturbations.parquet")
    assert set(df["perturbation"]) == {"overexpress"}
    assert {"gene_shift_tokens", "gene_shift_cos"} <= set(df.columns)
    _assert_equals_one_process(df, cells, perturbation="overexpress", genes=[a, (b, c), c], mode="approx",
                               gene_shifts=True, approx_check_cells=0)
    man = json.loads((out / "manifest.json").read_text())
    assert man["summary"]["n_skipped"] > 0
    assert "max_abs_dcos" in man["summary"]["approx_error"]


def test_parse_genes(tmp_path):
    assert parse_genes("all") == "all"
    assert parse_genes("TP53, ENSG00000141510+5,7") == ["TP53", ("ENSG00000141510", "5"), "7"]
    f = tmp_path / "genes.txt"
    f.write_text("# screen\nGATA1\nSPI1+CEBPA\n")
    assert parse_genes(str(f)) == ["GATA1", ("SPI1", "CEBPA")]


def test_several_devices_without_torchrun_spawn_one_worker_each(token_dir, ckpt, tmp_path, cells):
    out = tmp_path / "out"
    assert _run(token_dir, ckpt, out, "--devices", "cpu,cpu", "--no-stats") == 0
    df = pd.read_parquet(out / "perturbations.parquet")
    assert not df.duplicated(["cell_index", "gene_token"]).any()
    _assert_equals_one_process(df, cells)
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_pair_screen_writes_stats_per_pair(token_dir, ckpt, tmp_path, cells):
    # group rows have gene_token -1: their statistics are keyed by the group ("a+b"), and the plot renders
    a, b = int(cells[0][0]), int(cells[0][1])
    out = tmp_path / "out"
    assert _run(token_dir, ckpt, out, "--genes", f"{a}+{b}") == 0
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    st = pd.read_parquet(out / "gene_stats.parquet")
    assert st["target"].tolist() == [f"{a}+{b}"] and st["gene_token"].tolist() == [-1]
    assert st["n_cells"].iloc[0] == sum(a in c and b in c for c in cells) and (out / "gene_stats.png").exists()


def test_resume_refuses_other_dictionary_or_edited_gene_file(token_dir, ckpt, tmp_path, cells):
    import pickle

    genes = tmp_path / "genes.txt"
    genes.write_text(f"{int(cells[0][0])}\n")
    out = tmp_path / "out"
    assert _run(token_dir, ckpt, out, "--genes", str(genes)) == 0
    genes.write_text(f"{int(cells[0][1])}\n")
    assert _run(token_dir, ckpt, out, "--genes", str(genes), "--resume") == 2
    genes.write_text(f"{int(cells[0][0])}\n")
    td = tmp_path / "td.pkl"
    td.write_bytes(pickle.dumps({f"ENSG{i:011d}": i for i in range(200)}))
    assert _run(token_dir, ckpt, out, "--genes", str(genes), "--resume", "--token-dictionary", str(td)) == 2
    assert _run(token_dir, ckpt, out, "--genes", str(genes), "--resume") == 0


def test_resume_refuses_tokens_retokenized_in_place(token_dir, ckpt, tmp_path, capsys):
    import shutil

    tokens = tmp_path / "tokens"
    shutil.copytree(token_dir, tokens)
    (tokens / "__scfm__").mkdir(exist_ok=True)
    man = tokens / "__scfm__" / "manifest.json"
    man.write_text(json.dumps({"config_hash": "aaaa", "n_cells": 7, "status": "complete"}))
    out = tmp_path / "out"
    assert _run(tokens, ckpt, out) == 0
    man.write_text(json.dumps({"config_hash": "bbbb", "n_cells": 7, "status": "complete"}))
    capsys.readouterr()
    assert _run(tokens, ckpt, out, "--resume") == 2
    assert "tokens_config" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "expect"), [
    (["--anchor", "NOT_A_GENE_XYZ"], "--anchor"),
    (["--layer", "9"], "--layer"),
    (["--layer", "-2", "--emb-layer", "-1"], "give either --layer"),
    (["--layer", "-1", "--emb-layer", "0"], "give either --layer"),
    (["--perturb", "inhibit", "--rank-shift", "1.5"], "--rank-shift"),
    (["--pooling", "cls"], "pooling='cls'"),
    (["--target-embedding", "missing.npy"], "--target-embedding file not found"),
    (["--target-embedding", "bad.npy"], "hidden size is 48"),
    (["--cells-per-shard", "0"], "--cells-per-shard 0"),
    (["--devices", "cuda:99"], "--devices 'cuda:99'"),
])
def test_bad_options_give_one_line_errors(token_dir, ckpt, tmp_path, capsys, monkeypatch, extra, expect):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "bad.npy", np.zeros(7))
    extra = [*extra, "--cells-per-shard", "3"] if "--cells-per-shard" not in extra else extra
    from scfm_fast.cli import main

    rc = main(["perturb", str(token_dir), "--model", str(ckpt), "--out", str(tmp_path / "out"), "--special-tokens",
               ",".join(map(str, SPECIAL)), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and expect in err and "Traceback" not in err
    man = tmp_path / "out" / "manifest.json"
    assert not man.exists() or json.loads(man.read_text())["status"] != "complete"


def test_cells_longer_than_model_fail_before_any_shard(ckpt, tmp_path, capsys):
    d = tmp_path / "tokens"
    d.mkdir()
    lens = [5, 5, 5, 70]  # the tiny model has 64 positions; the long cell is in the last shard
    pq.write_table(pa.table({"input_ids": pa.array([list(range(4, 4 + n)) for n in lens], pa.list_(pa.int32()))}),
                   d / "part-0000-000000000000.parquet")
    finish_token_dir(d)
    assert run_cli(d, ckpt, tmp_path / "out", cells_per_shard=1) == 2
    err = capsys.readouterr().err
    assert "cell_index [3]" in err and "--max-len 64" in err
    assert not list((tmp_path / "out" / "shards").glob("*.parquet"))


def test_failed_worker_is_reported_without_waiting_for_its_shards(ckpt, tmp_path, capsys):
    import time

    # V2 cells (with <cls>) in shard 0, a V1 cell in shard 1: with --pooling cls only worker 1 fails
    d = tmp_path / "tokens"
    d.mkdir()
    rows = [*make_cells([5, 6], v2=True), *make_cells([5], seed=1)]
    pq.write_table(pa.table({"input_ids": pa.array([r.tolist() for r in rows], pa.list_(pa.int32()))}),
                   d / "part-0000-000000000000.parquet")
    finish_token_dir(d)
    t0 = time.monotonic()
    rc = run_cli(d, ckpt, tmp_path / "out", "--devices", "cpu,cpu", "--pooling", "cls", "--merge-timeout", "120",
                 cells_per_shard=2)
    assert rc == 2 and time.monotonic() - t0 < 100
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["status"] == "running"


def _v2_token_dir(path, cells):
    """A V2 token dataset whose manifest records its own special tokens (as ``scfm tokenize`` writes it)."""
    path.mkdir()
    t = pa.table({"input_ids": pa.array([c.tolist() for c in cells], pa.list_(pa.int32())),
                  "length": pa.array([len(c) for c in cells], pa.int32()),
                  "cell_index": pa.array(range(len(cells)), pa.int64())})
    pq.write_table(t, path / "part-0000-000000000000.parquet")
    (path / "__scfm__").mkdir()
    specials = dict(zip(("<pad>", "<mask>", "<cls>", "<eos>"), SPECIAL))
    (path / "__scfm__" / "manifest.json").write_text(json.dumps(
        {"status": "complete", "config_hash": "x", "n_cells": len(cells), "config": {"special_tokens": specials}}))
    return path


def test_specials_come_from_the_token_datasets_manifest(ckpt, tmp_path):
    # no --special-tokens / --token-dictionary: <cls>/<eos> (here 2, 3: genes in the bundled V1 dictionary)
    # must come from the dataset's manifest, or they are perturbed as genes and --pooling cls is refused
    from scfm_fast.cli import main

    cells = make_cells([6, 9, 4], v2=True, seed=3)
    d = _v2_token_dir(tmp_path / "tokens", cells)
    out = tmp_path / "out"
    rc = main(["perturb", str(d), "--model", str(ckpt), "--out", str(out), "--pooling", "cls", "--batch-tokens",
               "64", "--target-state", "cell_index=0,1"])
    assert rc == 0
    df = pd.read_parquet(out / "perturbations.parquet")
    assert not df["gene_token"].isin([CLS, EOS]).any()
    expect = perturb_cells(cells, tiny_model(), special_token_ids=SPECIAL, pooling="cls",
                           target_embedding=np.load(out / "target_embedding.npy"))
    np.testing.assert_allclose(df["cos_sim"], expect["cos_sim"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(df["target_shift"], expect["target_shift"], rtol=0, atol=1e-6)
    api = perturb_cells(str(d), tiny_model(), pooling="cls")  # the Python API reads the manifest too
    np.testing.assert_allclose(api["cos_sim"], expect["cos_sim"], rtol=0, atol=1e-6)


def test_several_input_files_keep_file_index_with_the_results(tmp_path, pbmc_path):
    # two files whose rows both start at 0: cell_index repeats, file_index tells the cells apart
    ad = pytest.importorskip("anndata")
    from scfm_fast.cli import main
    from scfm_fast.model.bert import BertEncoderModel
    from scfm_fast.model.checkpoint import save_encoder
    from scfm_fast.model.config import EncoderConfig
    from scfm_fast.store import read_table

    a = ad.read_h5ad(pbmc_path)
    a[:3].write_h5ad(tmp_path / "a.h5ad")
    a[3:5].write_h5ad(tmp_path / "b.h5ad")
    assert main(["tokenize", str(tmp_path / "a.h5ad"), str(tmp_path / "b.h5ad"), "--out", str(tmp_path / "tok"),
                 "--max-len", "12"]) == 0
    model = BertEncoderModel(EncoderConfig(vocab_size=25_426, hidden_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=24,
                                           max_position_embeddings=16)).eval()
    save_encoder(model, tmp_path / "ckpt")
    out = tmp_path / "out"
    assert main(["perturb", str(tmp_path / "tok"), "--model", str(tmp_path / "ckpt"), "--out", str(out),
                 "--cells-per-shard", "2", "--no-stats"]) == 0
    df = pd.read_parquet(out / "perturbations.parquet")
    assert list(df.columns[:2]) == ["cell_index", "file_index"]
    assert sorted(set(zip(df["file_index"], df["cell_index"]))) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert not df.duplicated(["file_index", "cell_index", "gene_token"]).any()
    tab = read_table(tmp_path / "tok")
    want = perturb_cells([np.asarray(c) for c in tab.column("input_ids").to_pylist()], model, progress_bar=False)
    np.testing.assert_allclose(df["cos_sim"], want["cos_sim"], rtol=0, atol=1e-6)


def test_length_check_works_chunk_by_chunk_and_ignores_padding(tmp_path):
    from scfm_fast.perturb._inputs import check_cells
    from scfm_fast.store.cells import open_cells

    model = tiny_model()  # 64 positions, pad id 0
    ok = [list(range(4, 40)), list(range(4, 64)) + [0] * 10]  # 70 ids, 60 after dropping padding
    bad = [list(range(4, 70))]
    chunks = [pa.array(ok, pa.list_(pa.int32())), pa.array(bad, pa.list_(pa.int32()))]
    table = pa.table({"input_ids": pa.chunked_array(chunks[:1]), "cell_index": [5, 6]})
    check_cells(open_cells(table), model, pooling="mean", special=SPECIAL, count_genes=False)  # padding does not count
    both = pa.table({"input_ids": pa.chunked_array(chunks), "cell_index": [5, 6, 7]})
    with pytest.raises(Exception, match=r"cell_index \[7\]"):
        check_cells(open_cells(both), model, pooling="mean", special=SPECIAL, count_genes=False)


def _manifest_dir(tmp_path, cells, status):
    """A token dataset directory with an scfm manifest of the given status."""
    from scfm_fast.store.schema import MANIFEST

    d = tmp_path / f"tokens_{status}"
    d.mkdir()
    pq.write_table(pa.table({"input_ids": pa.array([c.tolist() for c in cells], pa.list_(pa.int32()))}),
                   d / "part-0.parquet")
    (d / MANIFEST).parent.mkdir(parents=True)
    (d / MANIFEST).write_text(json.dumps({"status": status, "config": {}}))
    return d


def test_unfinished_or_empty_token_datasets_are_refused(ckpt, tmp_path, cells, capsys):
    assert _run(_manifest_dir(tmp_path, cells[:2], "running"), ckpt, tmp_path / "a") == 2
    assert "unfinished" in capsys.readouterr().err
    assert not (tmp_path / "a" / "perturbations.parquet").exists()
    assert _run(_manifest_dir(tmp_path, cells[:2], "complete"), ckpt, tmp_path / "b") == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    pq.write_table(pa.table({"input_ids": pa.array([], pa.list_(pa.int32()))}), empty / "part-0.parquet")
    finish_token_dir(empty)
    assert _run(empty, ckpt, tmp_path / "c") == 2
    assert "no cells" in capsys.readouterr().err


def test_bad_genes_and_token_ids_are_errors(token_dir, ckpt, tmp_path, capsys):
    assert _run(token_dir, ckpt, tmp_path / "a", "--genes", "genes/missing.txt") == 2
    assert "file not found" in capsys.readouterr().err
    assert _run(token_dir, ckpt, tmp_path / "b", "--genes", "5,NOT_A_GENE_XYZ") == 2
    assert "NOT_A_GENE_XYZ" in capsys.readouterr().err
    big = tmp_path / "big"
    big.mkdir()
    # the bad cell sits in the last shard: refused before the first shard is written
    rows = [[5, 6, 7]] * 7 + [[8, 900]]
    pq.write_table(pa.table({"input_ids": pa.array(rows, pa.list_(pa.int32()))}), big / "part-0000-000000000000.parquet")
    finish_token_dir(big)
    assert _run(big, ckpt, tmp_path / "c") == 2
    err = capsys.readouterr().err
    assert "outside the model's vocabulary of 200" in err and "Traceback" not in err
    assert not list((tmp_path / "c" / "shards").glob("*.parquet"))


def test_a_run_that_failed_before_any_shard_does_not_block_the_rerun(token_dir, ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(token_dir, ckpt, out, "--genes", "5,NOT_A_GENE_XYZ") == 2  # fails after writing its manifest
    capsys.readouterr()
    assert _run(token_dir, ckpt, out, "--genes", "all") == 0
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_workers_exit_when_their_parent_dies(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    code = f"""
import multiprocessing as mp, time
from scfm_fast.perturb._cli import _die_with_parent

def child():
    _die_with_parent()
    open({str(pid_file)!r}, "w").write(str(__import__("os").getpid()))
    time.sleep(120)

if __name__ == "__main__":
    mp.get_context("spawn").Process(target=child).start()
    time.sleep(120)
"""
    script = tmp_path / "parent.py"  # spawn re-imports __main__ from a file
    script.write_text(code)
    parent = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        for _ in range(600):
            if pid_file.exists() and pid_file.read_text():
                break
            time.sleep(0.1)
        child = int(pid_file.read_text())
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        for _ in range(100):
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the worker outlived its killed parent")
    finally:
        if parent.poll() is None:
            parent.kill()


def test_null_run_statistics(token_dir, ckpt, tmp_path, cells, capsys):
    from scfm_fast.perturb import gene_stats

    null_out, out = tmp_path / "null", tmp_path / "screen"
    random = ",".join(str(int(c[1])) for c in cells[:4])
    assert _run(token_dir, ckpt, null_out, "--genes", random) == 0
    assert _run(token_dir, ckpt, out, "--null-run", str(null_out)) == 0
    got = pd.read_parquet(out / "gene_stats.parquet")
    df = pd.read_parquet(out / "perturbations.parquet")
    want = gene_stats(df, null=pd.read_parquet(null_out / "perturbations.parquet")["shift"].to_numpy())
    np.testing.assert_allclose(got["pvalue"], want["pvalue"], rtol=1e-12)
    assert not np.allclose(got["pvalue"], gene_stats(df)["pvalue"])  # not the in-screen null
    assert _run(token_dir, ckpt, tmp_path / "x", "--null-run", str(tmp_path / "nothing")) == 2
    assert "no perturbations.parquet" in capsys.readouterr().err


def test_rank_thread_count_is_restored(token_dir, ckpt, tmp_path, monkeypatch):
    # a CPU rank of a torchrun job takes its share of the cores for the screen, then gives the caller's back
    import os

    import torch

    for k, v in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before, calls, real = torch.get_num_threads(), [], torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    assert _run(token_dir, ckpt, tmp_path / "out", "--devices", "cpu", "--no-stats", "--merge-timeout", "0") == 2
    assert calls == [max(1, (os.cpu_count() or 1) // 2), before]
    assert torch.get_num_threads() == before
