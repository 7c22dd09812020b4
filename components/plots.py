"""Figures logged to MLflow and written as DVC plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def training_curves(history: list[dict], path: Path, title: str) -> None:
    """Loss and validation metrics per epoch."""
    epochs = [h["epoch"] for h in history]
    keys = [k for k in history[0] if k not in ("epoch", "samples")] if history else []
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(3.2 * max(1, len(keys)), 2.8))
    for ax, key in zip(np.atleast_1d(axes), keys, strict=False):
        ax.plot(epochs, [h[key] for h in history], marker="o")
        ax.set_title(key)
        ax.set_xlabel("epoch")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def overlay_grid(images, gts, preds, queries, path: Path, title: str, cols: int = 4) -> None:
    """Ground truth (green) and prediction (red) contours over images, with their queries."""
    n = len(images)
    rows = max(1, int(np.ceil(n / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, img, gt, pr, q in zip(
        np.atleast_1d(axes).ravel(), images, gts, preds, queries, strict=False
    ):
        shown = img.astype(float) / 255.0
        shown[pr] = 0.5 * shown[pr] + 0.5 * np.array([1.0, 0.1, 0.1])
        ax.imshow(shown, interpolation="nearest")
        if gt.any():
            ax.contour(gt, levels=[0.5], colors="lime", linewidths=1.0)
        ax.set_title(q if len(q) <= 34 else q[:31] + "...", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tsne_domains(before: dict, after: dict, path: Path, seed: int = 0) -> None:
    """Fig. 7: t-SNE of source / target foreground features before and after adaptation.

    ``before`` / ``after``: {"source": (M, C) array, "target": (M', C) array}.
    """
    from sklearn.manifold import TSNE

    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, (title, feats) in zip(axes, (("before", before), ("after", after)), strict=True):
        x = np.concatenate([feats["source"], feats["target"]])
        emb = TSNE(2, init="pca", random_state=seed, perplexity=min(30, len(x) - 1)).fit_transform(
            x
        )
        n = len(feats["source"])
        ax.scatter(*emb[:n].T, s=4, c="tab:blue", label="source")
        ax.scatter(*emb[n:].T, s=4, c="tab:orange", label="target")
        ax.set_title(f"{title} adaptation")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reciprocal_masks(images, domain_masks, semantic_masks, queries, path: Path) -> None:
    """Fig. 9: domain-based (A^t) and semantic-based (A-bar^t) target masks side by side."""
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(6.6, 2.3 * n))
    axes = np.atleast_2d(axes)
    for row, (img, dm, sm, q) in enumerate(
        zip(images, domain_masks, semantic_masks, queries, strict=True)
    ):
        panels = ((q[:30], img), ("domain-based A^t", dm), ("semantic-based", sm))
        for col, (title, shown) in enumerate(panels):
            ax = axes[row, col]
            if col == 0:
                ax.imshow(shown, interpolation="nearest")
            else:
                ax.imshow(shown, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
