"""`plot_episode`: a PNG grid of an episode's support and query images with their labels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from metalearn.core import Episode


def _to_display(x: np.ndarray) -> np.ndarray:
    """Min-max scale one image to [0, 1] for display (any normalisation)."""
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def plot_episode(episode: Episode, path: str | Path, max_per_row: int = 20,
                 title: str | None = None, label_names: Sequence[str] | None = None) -> Path:
    """Save a grid of one episode (support rows, then query rows, sorted by label) as a PNG;
    `label_names[y]` (e.g. the character of each label) is printed under the support images."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    sx, sy = np.asarray(episode.support_x), np.asarray(episode.support_y)
    qx, qy = np.asarray(episode.query_x), np.asarray(episode.query_y)
    if sx.ndim != 4:
        raise ValueError(f"plot_episode needs one episode of images [n, H, W, C], got support_x "
                         f"{sx.shape}; index a batch first (jax.tree.map(lambda a: a[0], eps))")
    sets = [("support", sx, sy), ("query", qx, qy)]
    if episode.unlabeled_x is not None:
        ux = np.asarray(episode.unlabeled_x)
        sets.append(("unlabeled", ux, np.full(len(ux), -1)))
    rows = []  # (set name, images, labels) per grid row
    for name, x, y in sets:
        order = np.argsort(y, kind="stable")
        for s in range(0, len(order), max_per_row):
            part = order[s:s + max_per_row]
            rows.append((name, x[part], y[part]))
    ncol = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(0.9 * ncol, 1.05 * len(rows)),
                             squeeze=False)
    for r, (name, x, y) in enumerate(rows):
        for c in range(ncol):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(x):
                ax.axis("off")
                continue
            img = _to_display(x[c].astype(np.float32))
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            if y[c] >= 0:
                ax.set_title(str(int(y[c])), fontsize=7, pad=2)
            if label_names is not None and name == "support":
                ax.set_xlabel(label_names[int(y[c])], fontsize=5, labelpad=1)
        axes[r, 0].set_ylabel(name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
