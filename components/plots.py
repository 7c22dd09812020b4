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
