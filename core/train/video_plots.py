"""Plots of the video family: test predictions next to their frames, and the training curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from core.train.plots import _save


def _image(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) for imshow."""
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def plot_predictions(
    img_t: torch.Tensor,
    img_tk: torch.Tensor,
    pred: torch.Tensor,
    gaps: torch.Tensor,
    path: Path,
    title: str = "",
) -> Path:
    """One row per pair: img_t, the target img_tk, the prediction and its absolute error.

    img_t, img_tk, pred: (N, 3, H, W) in [0, 1]; gaps: (N,)."""
    n = img_t.shape[0]
    fig, axes = plt.subplots(n, 4, figsize=(8, 2.1 * n), squeeze=False)
    for i in range(n):
        err = (pred[i] - img_tk[i]).abs().mean(0).numpy()  # (H, W)
        mse = float((pred[i] - img_tk[i]).square().mean())
        panels = [
            (_image(img_t[i]), "img_t"),
            (_image(img_tk[i]), f"img_t+k (k={int(gaps[i])})"),
            (_image(pred[i]), f"prediction (mse {mse:.4f})"),
            (err, "|error|"),
        ]
        for ax, (picture, label) in zip(axes[i], panels, strict=True):
            ax.imshow(picture, cmap="magma" if picture.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_title(label, fontsize=8)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_training_curves(history: list[dict[str, float]], path: Path) -> Path:
    """Loss per epoch (train, val), val PSNR against the copy baseline, val probe accuracies and retrieval."""
    epochs = [int(r["epoch"]) + 1 for r in history]
    panels = [
        ("weighted MSE loss", {"train": "train/total_loss", "val": "val/total_loss"}),
        ("val PSNR (dB)", {"model": "val/psnr", "copy img_t": "val/copy_psnr"}),
        (
            "val representation",
            {
                "probe fused CLS": "val/probe_acc_fused",
                "probe P CLS": "val/probe_acc_p",
                "retrieval": "val/retrieval",
                "chance": "val/probe_chance",
            },
        ),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, series) in zip(axes, panels, strict=True):
        for label, key in series.items():
            points = [(e, r[key]) for e, r in zip(epochs, history, strict=True) if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", ms=3, label=label)
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
