"""Gene-level statistics of a perturbation screen: each gene's effect vs a random-gene null, BH FDR, plots.

Null model: a gene perturbed in ``n`` cells is compared with a *random* gene of the same screen, i.e.
with ``n`` values drawn from the pooled per-(cell, gene) values of every perturbation in the screen.

``method="ranksum"`` (default)
    Wilcoxon rank-sum (Mann-Whitney U) test of the gene's values against all other values of the
    screen, normal approximation with tie correction (as Geneformer's ``vs_null`` statistics rank a gene
    against random genes). Its p-values are not limited by a number of draws, so genome-wide screens
    (thousands of genes, Bonferroni-scale thresholds) can reach FDR < 0.05.
``method="empirical"``
    The null distribution of the mean of ``n`` pooled values, sampled (``n_null`` draws per distinct
    ``n``): p >= 1 / (n_null + 1), which only suits screens of few genes.
``method="normal"``
    That mean's null from the central limit theorem (pooled mean, pooled sd / sqrt(n)).

P-values are one-sided (larger shift than a random gene) for ``value="shift"`` and two-sided for
``target_shift``; FDR is Benjamini-Hochberg.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def bh_fdr(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values), in the input order."""
    p = np.asarray(p, dtype=np.float64)
    m = len(p)
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    ranked = p[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.clip(q, 0, 1)
    return out


def _normal_sf(z: np.ndarray) -> np.ndarray:
    from scipy.special import ndtr

    return ndtr(-z)


def _mean_null_p(pool: np.ndarray, n: np.ndarray, mean: np.ndarray, z: np.ndarray, *, mu: float, sd: float,
                 alt: str, n_null: int, normal: bool, seed: int) -> np.ndarray:
    """P-values of each gene's mean against the mean of ``n`` random pooled values (sampled or CLT);
    ``mu`` and ``sd`` are the pool's mean and standard deviation."""
    pv = np.empty(len(n))
    rng = np.random.default_rng(seed)
    for k in np.unique(n):
        sel = n == k
        if normal or k * n_null > 50_000_000 or sd == 0:
            pv[sel] = _normal_sf(z[sel]) if alt == "greater" else 2 * _normal_sf(np.abs(z[sel]))
            continue
        null = pool[rng.integers(0, len(pool), size=(n_null, int(k)))].mean(1)
        if alt == "greater":
            hits = (null[None, :] >= mean[sel][:, None] - 1e-15).sum(1)
        else:
            hits = (np.abs(null[None, :] - mu) >= np.abs(mean[sel] - mu)[:, None] - 1e-15).sum(1)
        pv[sel] = (1 + hits) / (n_null + 1)
    return pv


def _ranksum_z(codes: np.ndarray, values: np.ndarray, *, alt: str) -> np.ndarray:
    """Rank-sum z of each group's values (``codes`` 0..k-1) against all other values; NaN for a group
    with nothing to compare against (every value is its own, or all values tie).

    Ties get mid-ranks and the variance is tie-corrected. For ``n`` values of a group among ``N``,
    U = R - n(n+1)/2 has mean n(N-n)/2 and variance n(N-n)/12 * (N+1 - sum(t^3-t)/(N(N-1))). Continuity
    correction as ``scipy.stats.mannwhitneyu``: 0.5 is subtracted from U - mean for ``"greater"``, and
    from |U - mean| for ``"two-sided"``.
    """
    from scipy.stats import rankdata

    big_n = len(values)
    ranks = rankdata(values)
    _, ties = np.unique(values, return_counts=True)
    tie_term = float((ties.astype(np.float64) ** 3 - ties).sum()) / (big_n * (big_n - 1)) if big_n > 1 else 0.0
    r = np.bincount(codes, weights=ranks)
    n = np.bincount(codes).astype(np.float64)
    u = r - n * (n + 1) / 2
    m = n * (big_n - n)
    var = m / 12 * ((big_n + 1) - tie_term)
    d = u - m / 2
    d = d - 0.5 if alt == "greater" else np.sign(d) * np.maximum(np.abs(d) - 0.5, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(var > 0, d / np.sqrt(np.where(var > 0, var, 1.0)), np.nan)


def gene_stats(
    results: pd.DataFrame | str | Path,
    *,
    value: str = "shift",
    alternative: str | None = None,
    min_cells: int = 1,
    n_null: int = 2_000,
    method: str = "ranksum",
    seed: int = 0,
    null: np.ndarray | None = None,
) -> pd.DataFrame:
    """Rank perturbed genes by their mean effect against a random-gene null.

    Parameters
    ----------
    results
        A :func:`~scfm_fast.perturb.perturb_cells` table, or a Parquet file / directory of one.
    value
        Column to test: ``"shift"`` (1 - cosine similarity) or ``"target_shift"``.
    alternative
        ``"greater"`` or ``"two-sided"`` (default: greater for ``shift``, two-sided otherwise).
    min_cells
        Genes perturbed in fewer cells are dropped.
    n_null
        Null draws per distinct cell count (empirical method).
    method
        ``"ranksum"`` (Wilcoxon rank-sum against the rest of the screen), ``"empirical"`` (sampled
        null of the mean; falls back to normal for very large cell counts) or ``"normal"`` (see the
        module docstring).
    seed
        Seed of the null sampling.
    null
        Values of a separate null screen (e.g. ``--null-run DIR``'s perturbations of random genes): each
        target is then tested against them (rank-sum, tie-corrected, as ``scipy.stats.mannwhitneyu``'s
        asymptotic test) instead of against the rest of this screen.

    Returns
    -------
    pandas.DataFrame
        ``gene_token, target, ensembl_id, gene_name (symbols, when the results have them), n_cells, mean_<value>, median_<value>, std_<value>, z, pvalue,
        fdr, rank`` sorted by ``rank`` (1 = strongest). ``target`` is the token id, or ``"12+40"`` for a
        group perturbed together (``gene_token`` -1); each group size is tested against its own null
        (pairs against random pairs of the screen), then one FDR covers all. ``z`` is the test statistic
        on the normal scale (rank-sum z for ``ranksum``, else ``(mean - pooled mean) / (pooled sd /
        sqrt(n))``).
    """
    if not isinstance(results, pd.DataFrame):
        results = pd.read_parquet(results)
    if value not in results.columns:
        msg = f"results have no {value!r} column (have {list(results.columns)})"
        raise ValueError(msg)
    alt = alternative or ("greater" if value == "shift" else "two-sided")
    if alt not in ("greater", "two-sided"):
        msg = f"alternative={alt!r}; use 'greater' or 'two-sided'"
        raise ValueError(msg)
    if method not in ("ranksum", "empirical", "normal"):
        msg = f"method={method!r}; use 'ranksum', 'empirical' or 'normal'"
        raise ValueError(msg)
    # a NaN value (a cell with nothing left to read out) would make every p-value NaN
    df = results[np.isfinite(results[value].to_numpy(np.float64))]
    target, size = _targets(df)
    if null is not None:
        null = np.asarray(null, dtype=np.float64)
        null = null[np.isfinite(null)]
        if not len(null):
            msg = "the null run holds no finite values to compare against"
            raise ValueError(msg)
    parts = [_stats_of_kind(df[size == k], target[size == k], value=value, alt=alt, method=method,
                            min_cells=min_cells, n_null=n_null, seed=seed, null=null) for k in np.unique(size)]
    cols = ["gene_token", "target", "ensembl_id", "gene_name", "n_cells", f"mean_{value}", f"median_{value}", f"std_{value}",
            "z", "pvalue", "fdr", "rank"]
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(columns=cols)
    out = pd.concat(parts, ignore_index=True)
    pv = out["pvalue"].to_numpy(np.float64)
    # untestable targets (p NaN: e.g. the only pair of a screen has no random pairs to face) stay out
    # of the FDR and rank last
    ok = np.isfinite(pv)
    fdr = np.full(len(pv), np.nan)
    fdr[ok] = bh_fdr(pv[ok])
    out["fdr"] = fdr
    key = -out["_effect"].to_numpy() if alt == "greater" else -np.abs(out["_effect"].to_numpy())
    out = out.iloc[np.lexsort((key, np.where(ok, pv, np.inf)))].reset_index(drop=True)
    out["rank"] = np.arange(1, len(out) + 1)
    return out[[c for c in cols if c in out.columns]]


def _targets(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Each row's target (``"12"`` for a gene, ``"12+40"`` for a group of genes) and its number of genes."""
    tok = df["gene_token"].to_numpy()
    if (tok >= 0).all():
        return tok.astype(str), np.ones(len(tok), dtype=np.int64)
    if "gene_tokens" not in df.columns:
        msg = ("results hold groups (gene_token -1) but no 'gene_tokens' column to tell them apart; read "
               "perturbations.parquet with the gene_tokens column")
        raise ValueError(msg)
    groups = df["gene_tokens"].to_numpy()
    target = np.array([str(t) if t >= 0 else "+".join(str(int(x)) for x in g) for t, g in zip(tok, groups)],
                      dtype=object)
    size = np.array([1 if t >= 0 else len(g) for t, g in zip(tok, groups)], dtype=np.int64)
    return target, size


def _vs_null_z(codes: np.ndarray, values: np.ndarray, null: np.ndarray, *, alt: str) -> np.ndarray:
    """Rank-sum z of each group's values against a separate null sample (two-sample Mann-Whitney, tie
    corrected over the group and the null together, continuity as in :func:`_ranksum_z`)."""
    from scipy.stats import rankdata

    z = np.full(codes.max() + 1 if len(codes) else 0, np.nan)
    m = len(null)
    for c in range(len(z)):
        x = values[codes == c]
        n = len(x)
        both = np.concatenate([x, null])
        big_n = n + m
        _, ties = np.unique(both, return_counts=True)
        tie_term = float((ties.astype(np.float64) ** 3 - ties).sum()) / (big_n * (big_n - 1)) if big_n > 1 else 0.0
        u = rankdata(both)[:n].sum() - n * (n + 1) / 2
        var = n * m / 12 * ((big_n + 1) - tie_term)
        d = u - n * m / 2
        d = d - 0.5 if alt == "greater" else np.sign(d) * max(abs(d) - 0.5, 0.0)
        z[c] = d / np.sqrt(var) if var > 0 else np.nan
    return z


def _stats_of_kind(df: pd.DataFrame, target: np.ndarray, *, value: str, alt: str, method: str, min_cells: int,
                   n_null: int, seed: int, null: np.ndarray | None = None) -> pd.DataFrame:
    """Statistics of targets of one kind (single genes, or groups of one size) against their own null:
    a pair is compared with random pairs of the screen, a gene with random genes."""
    pool = df[value].to_numpy(np.float64)
    codes, uniques = pd.factorize(target, sort=True)
    g = df.groupby(codes, sort=True)
    out = pd.DataFrame({
        "gene_token": g["gene_token"].first().to_numpy(),
        "target": np.asarray(uniques, dtype=str),
        "n_cells": g[value].size().to_numpy(),
        f"mean_{value}": g[value].mean().to_numpy(),
        f"median_{value}": g[value].median().to_numpy(),
        f"std_{value}": g[value].std(ddof=1).to_numpy(),
    })
    if "ensembl_id" in df.columns:
        out.insert(2, "ensembl_id", g["ensembl_id"].first().to_numpy())
    if "gene_name" in df.columns:
        out.insert(3 if "ensembl_id" in df.columns else 2, "gene_name", g["gene_name"].first().to_numpy())
    if null is not None:
        out["z"] = _vs_null_z(codes, pool, null, alt=alt)
        pool = null  # effects are measured from the null run's mean
    elif method == "ranksum":  # ranked against every other value, before targets are dropped by min_cells
        out["z"] = _ranksum_z(codes, pool, alt=alt)
    out = out[out["n_cells"] >= min_cells].reset_index(drop=True)
    n = out["n_cells"].to_numpy()
    mean = out[f"mean_{value}"].to_numpy()
    mu, sd = float(pool.mean()), float(pool.std(ddof=1)) if len(pool) > 1 else 0.0
    if method == "ranksum" or null is not None:
        z = out["z"].to_numpy()
        pv = _normal_sf(z) if alt == "greater" else np.minimum(2 * _normal_sf(np.abs(z)), 1.0)
    else:
        se = sd / np.sqrt(n) if sd > 0 else np.full(len(n), np.inf)
        out["z"] = z = (mean - mu) / se
        pv = _mean_null_p(pool, n, mean, z, mu=mu, sd=sd, alt=alt, n_null=n_null, normal=method == "normal",
                          seed=seed)
    out["pvalue"] = pv
    out["_effect"] = mean - mu
    return out


def plot_gene_stats(stats: pd.DataFrame, path: str | Path, *, value: str = "shift", fdr: float = 0.05,
                    top: int = 15) -> Path:
    """Ranked-effect and volcano plots of :func:`gene_stats` output, saved as a PNG (matplotlib Agg).

    Parameters
    ----------
    stats
        Output of :func:`gene_stats`.
    path
        PNG file to write.
    value
        The tested column (``shift`` or ``target_shift``).
    fdr
        Genes below this FDR are highlighted.
    top
        Number of top genes to label.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    col = f"mean_{value}"
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    by_eff = stats.sort_values(col, ascending=False).reset_index(drop=True)
    sig = by_eff["fdr"] < fdr
    x = np.arange(1, len(by_eff) + 1)
    a1.scatter(x[~sig], by_eff.loc[~sig, col], s=6, c="0.6", label=f"FDR >= {fdr}")
    a1.scatter(x[sig], by_eff.loc[sig, col], s=10, c="tab:red", label=f"FDR < {fdr}")
    a1.set_xlabel("gene rank by mean effect")
    a1.set_ylabel(col)
    a1.set_xscale("log" if len(by_eff) > 50 else "linear")
    a1.legend(frameon=False)
    # label by symbol where one is known (gene_name falls back to the Ensembl ID, then the token id)
    names = next((stats[c] for c in ("gene_name", "ensembl_id") if c in stats), stats["target"])
    lp = -np.log10(np.maximum(stats["pvalue"].to_numpy(), 1e-300))
    s2 = stats["fdr"].to_numpy() < fdr
    a2.scatter(stats.loc[~s2, col], lp[~s2], s=6, c="0.6")
    a2.scatter(stats.loc[s2, col], lp[s2], s=10, c="tab:red")
    for i in range(min(top, len(stats))):
        a2.annotate(str(names.iloc[i] if names.iloc[i] is not None else stats["target"].iloc[i]),
                    (stats[col].iloc[i], lp[i]), fontsize=6)
    a2.set_xlabel(col)
    a2.set_ylabel("-log10 p (vs random-gene null)")
    fig.suptitle(f"{len(stats):,} genes; {int(s2.sum()):,} at FDR < {fdr}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summarize(stats: pd.DataFrame, *, fdr: float = 0.05) -> dict[str, Any]:
    return {"n_genes": len(stats), "n_significant": int((stats["fdr"] < fdr).sum()) if len(stats) else 0,
            "top_genes": stats["target"].head(10).astype(str).tolist() if len(stats) else [],
            "fdr_threshold": fdr, "nan_free": bool(not any(math.isnan(v) for v in stats.get("pvalue", []))),
            "n_untestable": int(sum(math.isnan(v) for v in stats.get("pvalue", [])))}
