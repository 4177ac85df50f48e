"""A first look at cell embeddings: their two leading principal components, coloured by a cell label."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_embedding_pca(emb: np.ndarray, color: np.ndarray | None, path: str | Path, *, label: str = "",
                       title: str = "Cell embeddings", max_points: int = 50_000, seed: int = 0) -> Path:
    """Scatter the embeddings' PC1/PC2 to a PNG, coloured by ``color``.

    Parameters
    ----------
    emb
        ``(n_cells, hidden)``; rows with NaN (cells without genes) are left out.
    color
        ``(n_cells,)`` numbers (a colour bar) or labels (a legend; the 20 most frequent, the rest grey), or
        ``None``.
    path
        Output PNG.
    label
        Name of the colour variable.
    title
        Plot title.
    max_points
        A random subset of at most this many cells is drawn (the PCA is fitted on it too).
    seed
        Seed of that subset.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = np.flatnonzero(np.isfinite(emb).all(axis=1))
    if ok.size > max_points:
        ok = np.sort(np.random.default_rng(seed).choice(ok, size=max_points, replace=False))
    x = emb[ok].astype(np.float64)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    if x.shape[0] >= 2:  # else an empty frame (and no mean-of-nothing warning)
        x -= x.mean(0)
        u, s, _ = np.linalg.svd(x, full_matrices=False)
        pc = u[:, :2] * s[:2]
        if pc.shape[1] < 2:
            pc = np.column_stack([pc[:, 0], np.zeros(len(pc))])
        c = None if color is None else np.asarray(color)[ok]
        if c is None:
            ax.scatter(pc[:, 0], pc[:, 1], s=6)
        elif np.issubdtype(c.dtype, np.number):
            sc = ax.scatter(pc[:, 0], pc[:, 1], c=c, s=6, cmap="viridis")
            fig.colorbar(sc, label=label)
        else:
            c = c.astype(str)
            vals, counts = np.unique(c, return_counts=True)
            top = vals[np.argsort(-counts, kind="stable")][:20]
            rest = ~np.isin(c, top)
            if rest.any():
                ax.scatter(pc[rest, 0], pc[rest, 1], s=4, c="lightgrey", label="other")
            for v in top:
                m = c == v
                ax.scatter(pc[m, 0], pc[m, 1], s=6, label=v)
            ax.legend(title=label, fontsize=7, markerscale=2, loc="best")
    ax.set(xlabel="PC1", ylabel="PC2", title=f"{title} ({len(ok):,} cells)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path
