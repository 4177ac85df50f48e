"""Cell states: selecting cells by metadata, a state's mean embedding, and `scfm perturb --filter/--target-state`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from scfm_fast._errors import InputFileError, UsageError
from scfm_fast.perturb import perturb_cells, select_cells, state_embedding
from scfm_fast.perturb.states import parse_where

from .conftest import SPECIAL, finish_token_dir, make_cells, run_cli, tiny_model

DISEASE = ["dcm", "nf", "dcm", "hcm", "nf", "dcm", "nf"]
BATCH = [1, 1, 2, 2, 3, 3, 3]


@pytest.fixture(scope="module")
def cells():
    return make_cells([6, 9, 4, 12, 7, 10, 5], seed=7)


def _table(cells):
    return pa.table({"input_ids": pa.array([c.tolist() for c in cells], pa.list_(pa.int32())),
                     "disease": pa.array(DISEASE).dictionary_encode(), "batch": pa.array(BATCH, pa.int64())})


def test_parse_where():
    assert parse_where("disease=dcm,hcm; batch=3") == {"disease": ["dcm", "hcm"], "batch": ["3"]}
    for bad in ("disease", "=dcm", "disease=", ""):
        with pytest.raises(UsageError, match="COLUMN=VALUE"):
            parse_where(bad)


def test_select_cells_by_string_and_integer_columns(cells):
    t = select_cells(_table(cells), {"disease": ["dcm", "hcm"], "batch": "2"})
    assert t.column("cell_index").to_pylist() == [2, 3]
    assert t.column("input_ids").to_pylist() == [cells[2].tolist(), cells[3].tolist()]
    assert select_cells(_table(cells), {"disease": "nf"}).column("cell_index").to_pylist() == [1, 4, 6]


def test_select_cells_from_a_directory_reads_only_the_kept_cells_tokens(state_dir, cells, monkeypatch):
    from scfm_fast.store.cells import CellSource

    asked: list = []
    real = CellSource._gather

    def spy(self, flat, indices, dtype):  # every token read goes through _gather
        asked.append(len(np.asarray(indices).reshape(-1)))
        return real(self, flat, indices, dtype)

    monkeypatch.setattr(CellSource, "_gather", spy)
    t = select_cells(str(state_dir), {"disease": ["dcm", "hcm"], "batch": "2"})
    assert t.column("input_ids").to_pylist() == [cells[2].tolist(), cells[3].tolist()]
    assert t.column("cell_index").to_pylist() == [2, 3]
    assert asked == [2]


def test_select_cells_explains_what_is_missing(cells):
    with pytest.raises(InputFileError, match="--obs-columns tissue"):
        select_cells(_table(cells), {"tissue": "heart"})
    with pytest.raises(InputFileError, match=r"no cell has disease in \['healthy'\].*dcm"):
        select_cells(_table(cells), {"disease": "healthy"})


@pytest.mark.parametrize("pooling,v2", [("mean", False), ("cls", True)])
def test_state_embedding_is_mean_of_reference_readouts(cells, pooling, v2):
    model = tiny_model()
    cs = make_cells([6, 9, 4, 12, 7, 10, 5], seed=7, v2=v2)
    got, n = state_embedding(_table(cs), model, where={"disease": "nf"}, layer=-2, pooling=pooling,
                             special_token_ids=SPECIAL, progress_bar=False)
    want = []
    with torch.no_grad():
        for i in (1, 4, 6):
            h = model.forward_reference(torch.as_tensor(cs[i])[None], layer=-2)[0]
            keep = torch.as_tensor(~np.isin(cs[i], SPECIAL))
            want.append((h[0] if pooling == "cls" else h[keep].mean(0)).numpy())
    assert n == 3
    np.testing.assert_allclose(got, np.mean(want, axis=0), rtol=0, atol=2e-6)


def test_target_state_shift_matches_definition(cells):
    # target_shift = cos(perturbed, target) - cos(unperturbed, target), per variant
    model = tiny_model()
    target, _ = state_embedding(_table(cells), model, where={"disease": "nf"}, special_token_ids=SPECIAL,
                                progress_bar=False)
    df = perturb_cells([cells[0]], model, genes="all", special_token_ids=SPECIAL, target_embedding=target,
                       progress_bar=False)
    old = perturb_cells([cells[0]], model, genes="all", special_token_ids=SPECIAL, target_embedding=target,
                        state_shift="aligned", progress_bar=False)

    def pooled(ids, drop):
        with torch.no_grad():
            h = model.forward_reference(torch.as_tensor(ids)[None], layer=-2)[0].double()
        keep = [t not in drop for t in ids]
        return h[torch.as_tensor(keep)].mean(0).numpy()

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    assert sorted(df["gene_token"]) == sorted({int(t) for t in cells[0]} - set(SPECIAL))
    for (_, row), aligned in zip(df.iterrows(), old["target_shift"]):
        g = int(row["gene_token"])
        # default (Geneformer today): each cell is the mean over all its genes
        pert = pooled(np.array([t for t in cells[0] if t != g]), set(SPECIAL))
        orig = pooled(cells[0], set(SPECIAL))
        assert row["target_shift"] == pytest.approx(cos(pert, target) - cos(orig, target), abs=2e-6)
        # state_shift="aligned" (its 2023 code): the perturbed gene left out of the original too
        orig = pooled(cells[0], {g, *SPECIAL})
        assert aligned == pytest.approx(cos(pert, target) - cos(orig, target), abs=2e-6)


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory, cells):
    d = tmp_path_factory.mktemp("tokens_states")
    t = _table(cells)
    pq.write_table(t.slice(0, 4), d / "part-0000-000000000000.parquet")
    pq.write_table(t.slice(4), d / "part-0001-000000000000.parquet")
    return finish_token_dir(d)


def _run(token_dir, ckpt, out, *extra):
    return run_cli(token_dir, ckpt, out, *extra, cells_per_shard=2)


def test_cli_filter_and_target_state(state_dir, ckpt, tmp_path, cells):
    out = tmp_path / "out"
    assert _run(state_dir, ckpt, out, "--filter", "disease=dcm", "--target-state", "disease=nf") == 0
    df = pd.read_parquet(out / "perturbations.parquet")
    dcm = [i for i, d in enumerate(DISEASE) if d == "dcm"]
    assert sorted(df["cell_index"].unique()) == dcm
    assert len(df) == sum(len(cells[i]) for i in dcm)
    target = np.load(out / "target_embedding.npy")
    want, _ = state_embedding(state_dir, tiny_model(), where={"disease": "nf"}, special_token_ids=SPECIAL,
                              progress_bar=False)
    np.testing.assert_allclose(target, want, rtol=0, atol=1e-6)
    api = perturb_cells([cells[i] for i in dcm], tiny_model(), special_token_ids=SPECIAL, target_embedding=want,
                        progress_bar=False)
    np.testing.assert_allclose(df["target_shift"], api["target_shift"], rtol=0, atol=1e-6)
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["filter"] == "disease=dcm" and man["config"]["target_state"] == "disease=nf"
    # a resumed run with the same settings is accepted; other states are refused without --overwrite
    assert _run(state_dir, ckpt, out, "--filter", "disease=dcm", "--target-state", "disease=nf", "--resume") == 0
    assert _run(state_dir, ckpt, out, "--filter", "disease=hcm", "--target-state", "disease=nf", "--resume") == 2


def test_cli_refuses_bad_state_options(state_dir, ckpt, tmp_path, capsys):
    npy = tmp_path / "t.npy"
    np.save(npy, np.zeros(48))
    assert _run(state_dir, ckpt, tmp_path / "a", "--target-embedding", str(npy), "--target-state", "disease=nf") == 2
    assert "not both" in capsys.readouterr().err
    assert _run(state_dir, ckpt, tmp_path / "b", "--filter", "tissue=heart") == 2
    assert "--obs-columns tissue" in capsys.readouterr().err


@pytest.mark.parametrize("aggregate", ["mean", "median"])
def test_cli_cell_states_goal_and_alt(state_dir, ckpt, tmp_path, cells, aggregate):
    spec = tmp_path / "states.json"
    spec.write_text(json.dumps({"state_key": "disease", "start_state": "dcm", "goal_state": "nf",
                                "alt_states": ["hcm"]}))
    out = tmp_path / "out"
    assert _run(state_dir, ckpt, out, "--cell-states", str(spec), "--state-aggregate", aggregate,
                "--max-state-cells", "2") == 0
    df = pd.read_parquet(out / "perturbations.parquet")
    dcm = [i for i, d in enumerate(DISEASE) if d == "dcm"]
    assert sorted(df["cell_index"].unique()) == dcm  # only the start state is perturbed
    saved = np.load(out / "state_embeddings.npz")
    assert saved["states"].tolist() == ["nf", "hcm"] and saved["n_cells"].tolist() == [2, 1]  # 3 nf cells, 2 drawn
    model = tiny_model()
    for k, st in enumerate(("nf", "hcm")):
        want, n = state_embedding(state_dir, model, where={"disease": st}, special_token_ids=SPECIAL, max_cells=2,
                                  aggregate=aggregate, progress_bar=False)
        np.testing.assert_allclose(saved["embeddings"][k], want, rtol=0, atol=1e-6)
    api = perturb_cells([cells[i] for i in dcm], model, special_token_ids=SPECIAL, target_embedding=saved["embeddings"],
                        target_names=["shift_nf", "shift_hcm"], progress_bar=False)
    for c in ("shift_nf", "shift_hcm"):
        np.testing.assert_allclose(df[c], api[c], rtol=0, atol=1e-6)
    assert (out / "gene_stats.parquet").is_file() and (out / "gene_stats_shift_hcm.parquet").is_file()
    st = pd.read_parquet(out / "gene_stats.parquet")
    assert "mean_shift_nf" in st.columns and st["fdr"].between(0, 1).all()
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["cell_states"]["alt_states"] == ["hcm"]
    assert set(man["summary"]["state_stats"]) == {"shift_nf", "shift_hcm"}


def test_state_embedding_sample_is_seeded_and_median_is_elementwise(state_dir):
    model = tiny_model()
    all_nf, n = state_embedding(state_dir, model, where={"disease": "nf"}, special_token_ids=SPECIAL,
                                aggregate="median", progress_bar=False)
    assert n == 3
    from scfm_fast.embed import embed_tokens

    rows = select_cells(state_dir, {"disease": "nf"})
    emb, _ = embed_tokens(rows, model, layer=-2, pooling="mean", special_token_ids=SPECIAL, progress_bar=False)
    np.testing.assert_allclose(all_nf, np.median(emb.astype(np.float64), axis=0), rtol=0, atol=1e-6)
    a, _ = state_embedding(state_dir, model, where={"disease": "nf"}, special_token_ids=SPECIAL, max_cells=2,
                           seed=3, progress_bar=False)
    b, _ = state_embedding(state_dir, model, where={"disease": "nf"}, special_token_ids=SPECIAL, max_cells=2,
                           seed=3, progress_bar=False)
    np.testing.assert_array_equal(a, b)


def test_cli_refuses_bad_cell_states(state_dir, ckpt, tmp_path, capsys):
    assert _run(state_dir, ckpt, tmp_path / "a", "--cell-states", '{"state_key": "disease"}') == 2
    assert "missing" in capsys.readouterr().err
    assert _run(state_dir, ckpt, tmp_path / "b", "--cell-states", "nope.json") == 2
    assert "file not found" in capsys.readouterr().err
    ok = '{"state_key": "disease", "start_state": "dcm", "goal_state": "nf"}'
    assert _run(state_dir, ckpt, tmp_path / "c", "--cell-states", ok, "--filter", "disease=dcm") == 2
    assert "drop --filter" in capsys.readouterr().err


def test_screen_reads_tokens_part_by_part(monkeypatch):
    # a screen without --filter holds at most one part of the cells' tokens at a time, never the corpus
    from scfm_fast.perturb import _inputs
    from scfm_fast.store.cells import CellSource

    cells = make_cells([6 + i % 5 for i in range(23)], seed=3)
    sizes: list[int] = []
    real = CellSource._gather

    def spy(self, flat, indices, dtype):
        sizes.append(len(np.asarray(indices).reshape(-1)))
        return real(self, flat, indices, dtype)

    monkeypatch.setattr(CellSource, "_gather", spy)
    monkeypatch.setattr(_inputs, "PART_CELLS", 4)
    whole = perturb_cells(cells, tiny_model(), special_token_ids=SPECIAL, progress_bar=False)
    assert sizes and max(sizes) == 4 and sum(sizes) % len(cells) == 0
    monkeypatch.setattr(CellSource, "_gather", real)
    monkeypatch.setattr(_inputs, "PART_CELLS", 1024)
    one = perturb_cells(cells, tiny_model(), special_token_ids=SPECIAL, progress_bar=False)
    pd.testing.assert_frame_equal(whole, one)  # parts change what is held, never the results
