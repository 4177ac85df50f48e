"""Gene statistics: BH FDR, a planted strong gene ranks first, plots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scfm_fast.perturb import gene_stats, plot_gene_stats
from scfm_fast.perturb.stats import bh_fdr, summarize


def test_bh_fdr_matches_definition():
    p = np.array([0.01, 0.04, 0.03, 0.5, 0.001])
    q = bh_fdr(p)
    order = np.argsort(p)
    m = len(p)
    manual = np.minimum.accumulate((p[order] * m / np.arange(1, m + 1))[::-1])[::-1]
    np.testing.assert_allclose(q[order], manual)
    assert (q >= p).all() and q.max() <= 1


def _screen(seed=0, n_genes=40, n_cells=25, planted=7, effect=0.03):
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_cells):
        for g in range(4, 4 + n_genes):
            if rng.random() < 0.8:
                s = rng.exponential(0.01) + (effect if g == planted else 0.0)
                rows.append({"cell_index": c, "gene_token": g, "ensembl_id": f"G{g}", "shift": s,
                             "target_shift": rng.normal(0.02 if g == planted else 0.0, 0.01)})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("method", ["ranksum", "empirical", "normal"])
def test_planted_gene_ranks_first(method):
    st = gene_stats(_screen(), method=method)
    assert st["gene_token"].iloc[0] == 7 and st["rank"].iloc[0] == 1
    # the empirical null's resolution is 1 / (n_null + 1): p >= 5e-4, BH over 40 genes -> q >= 0.02
    assert st["fdr"].iloc[0] < 0.05
    assert (st["fdr"].iloc[1:] > 0.05).mean() > 0.9
    assert st["n_cells"].between(10, 25).all()


def test_two_sided_target_shift_and_min_cells():
    df = _screen()
    st = gene_stats(df, value="target_shift", min_cells=5)
    assert st["gene_token"].iloc[0] == 7 and "mean_target_shift" in st
    # a gene moved strongly *away* (negative mean) is found by the two-sided test (default for
    # target_shift) and not by a one-sided 'greater' test
    df.loc[df["gene_token"] == 9, "target_shift"] -= 0.05
    two = gene_stats(df, value="target_shift")
    assert set(two["gene_token"].iloc[:2]) == {7, 9} and (two["fdr"].iloc[:2] < 0.05).all()
    one = gene_stats(df, value="target_shift", alternative="greater")
    assert one.set_index("gene_token").loc[9, "pvalue"] > 0.9
    # genes perturbed in fewer than min_cells cells are dropped, the rest keep their counts
    rare = df[(df["gene_token"] != 11) | (df["cell_index"] < 3)]
    assert rare[rare["gene_token"] == 11].shape[0] <= 3
    kept = gene_stats(rare, min_cells=4)
    assert 11 not in set(kept["gene_token"]) and kept["n_cells"].min() >= 4
    assert 11 in set(gene_stats(rare, min_cells=1)["gene_token"])
    with pytest.raises(ValueError, match="no 'nope' column"):
        gene_stats(df, value="nope")
    with pytest.raises(ValueError, match="alternative='less'"):
        gene_stats(df, alternative="less")


def test_empirical_and_normal_p_values_agree_and_summary():
    df = _screen(seed=3)
    emp = gene_stats(df, method="empirical", n_null=4000).set_index("gene_token")
    nor = gene_stats(df, method="normal").set_index("gene_token")
    mid = (nor["pvalue"] > 0.05) & (nor["pvalue"] < 0.95)
    assert mid.sum() > 10
    np.testing.assert_allclose(emp.loc[mid[mid].index, "pvalue"], nor.loc[mid, "pvalue"], atol=0.08)
    summ = summarize(gene_stats(df))
    assert summ["n_genes"] == df["gene_token"].nunique() and summ["top_genes"][0] == "7"
    assert summ["n_significant"] >= 1 and summ["nan_free"]
    assert summarize(gene_stats(df.iloc[:0]))["n_genes"] == 0


def test_plot_writes_png(tmp_path):
    st = gene_stats(_screen())
    p = plot_gene_stats(st, tmp_path / "x" / "stats.png")
    assert p.read_bytes()[:4] == b"\x89PNG"


def test_nan_values_do_not_poison_every_pvalue():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"gene_token": rng.integers(4, 30, 400), "shift": rng.random(400)})
    clean = gene_stats(df)
    df.loc[len(df)] = {"gene_token": 99, "shift": np.nan}  # e.g. a table from an older version
    st = gene_stats(df)
    assert np.isfinite(st["z"]).all() and 99 not in st["gene_token"].tolist()
    pd.testing.assert_frame_equal(st, clean)


@pytest.mark.parametrize("alternative", ["greater", "two-sided"])
def test_ranksum_equals_mann_whitney_of_gene_vs_rest(alternative):
    scipy_stats = pytest.importorskip("scipy.stats")
    df = _screen(seed=5)
    df["shift"] = df["shift"].round(3)  # ties, so the tie correction is exercised
    st = gene_stats(df, method="ranksum", alternative=alternative).set_index("gene_token")
    for g in sorted(set(df["gene_token"])):  # every gene: p above and below 1/2
        mine = df["gene_token"] == g
        want = scipy_stats.mannwhitneyu(df.loc[mine, "shift"], df.loc[~mine, "shift"], alternative=alternative,
                                        method="asymptotic", use_continuity=True).pvalue
        assert st.loc[g, "pvalue"] == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_genome_wide_screen_can_reach_fdr():
    # 2,000 genes: an empirical null of 2,000 draws cannot give p < 5e-4, so BH over 2,000 genes can
    # never pass 0.05; the rank-sum test finds the planted genes
    rng = np.random.default_rng(0)
    n_genes, n_cells, planted = 2_000, 30, [4, 5, 6]
    g = np.repeat(np.arange(4, 4 + n_genes), n_cells)
    shift = rng.exponential(0.01, g.size) + np.isin(g, planted) * 0.02
    df = pd.DataFrame({"cell_index": np.tile(np.arange(n_cells), n_genes), "gene_token": g, "shift": shift})
    rs = gene_stats(df)
    assert set(rs.loc[rs["fdr"] < 0.05, "gene_token"]) == set(planted)
    assert (gene_stats(df, method="empirical", n_null=500)["fdr"] >= 0.05).all()


def test_pairs_are_tested_against_random_pairs():
    # singles and pairs in one screen: pairs (larger shifts) must not make every single look weak, and
    # a planted pair stands out among pairs
    df = _screen(seed=2)
    df["gene_tokens"] = [[g] for g in df["gene_token"]]
    rng = np.random.default_rng(1)
    pairs = []
    for c in range(25):
        for a, b in [(4, 5), (6, 8), (9, 10), (11, 12), (13, 14)]:
            s = rng.exponential(0.02) + 0.05 + (0.05 if (a, b) == (6, 8) else 0.0)
            pairs.append({"cell_index": c, "gene_token": -1, "gene_tokens": [a, b], "ensembl_id": f"G{a}+G{b}",
                          "shift": s})
    st = gene_stats(pd.concat([df, pd.DataFrame(pairs)], ignore_index=True))
    singles, grouped = st[st["gene_token"] >= 0], st[st["gene_token"] < 0]
    assert singles["target"].iloc[0] == "7" and singles["fdr"].iloc[0] < 0.05
    assert grouped["target"].iloc[0] == "6+8" and set(grouped["target"]) == {"4+5", "6+8", "9+10", "11+12", "13+14"}
    assert (grouped["n_cells"] == 25).all()
    alone = gene_stats(df).set_index("target")
    np.testing.assert_allclose(singles.set_index("target").loc[alone.index, "pvalue"], alone["pvalue"])


def test_untestable_groups_get_no_p_value_and_rows_need_their_members():
    # one pair among single genes: there are no other pairs to compare it with
    df = _screen(seed=4)
    df["gene_tokens"] = [[g] for g in df["gene_token"]]
    pair = pd.DataFrame({"cell_index": range(5), "gene_token": -1, "gene_tokens": [[4, 5]] * 5,
                         "ensembl_id": "G4+G5", "shift": 0.5})
    st = gene_stats(pd.concat([df, pair], ignore_index=True))
    row = st[st["target"] == "4+5"].iloc[0]
    assert np.isnan(row["pvalue"]) and np.isnan(row["fdr"]) and row["rank"] == len(st)
    np.testing.assert_allclose(st[st["gene_token"] >= 0].set_index("target")["fdr"].sort_index(),
                               gene_stats(df).set_index("target")["fdr"].sort_index())
    assert summarize(st)["n_untestable"] == 1
    with pytest.raises(ValueError, match="gene_tokens"):
        gene_stats(pd.concat([df, pair], ignore_index=True).drop(columns="gene_tokens"))


def test_gene_names_travel_into_the_stats_and_plot_labels(tmp_path, monkeypatch):
    df = _screen()
    df["gene_name"] = "G" + df["gene_token"].astype(str)
    st = gene_stats(df)
    assert "gene_name" in st.columns
    assert (st["gene_name"] == "G" + st["gene_token"].astype(str)).all()
    import matplotlib.axes

    labels = []
    orig = matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate",
                        lambda self, text, *a, **k: labels.append(str(text)) or orig(self, text, *a, **k))
    plot_gene_stats(st, tmp_path / "s.png")
    assert labels and all(lbl.startswith("G") for lbl in labels)


@pytest.mark.parametrize("alternative", ["greater", "two-sided"])
def test_null_run_is_a_two_sample_mann_whitney(alternative):
    from scipy.stats import mannwhitneyu

    df = _screen()
    null = np.random.default_rng(7).normal(df["shift"].mean(), df["shift"].std(), size=300).round(3)  # ties
    st = gene_stats(df, null=null, alternative=alternative)
    for _, row in st.iterrows():
        x = df.loc[df["gene_token"] == row["gene_token"], "shift"]
        want = mannwhitneyu(x, null, alternative=alternative, method="asymptotic").pvalue
        assert row["pvalue"] == pytest.approx(want, rel=1e-9, abs=1e-300)
    with pytest.raises(ValueError, match="null run"):
        gene_stats(df, null=np.array([np.nan]))
