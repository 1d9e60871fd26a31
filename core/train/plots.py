"""Plots a person would rather look at than read: loss curves, predicted-vs-true progress, calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from core.metrics.progress_eval import ActionCurve

_STYLE = {
    "total_loss": ("tab:blue", "-"),
    "alignment_loss": ("tab:green", "--"),
    "progress_loss": ("tab:red", ":"),
}


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_dual_losses(history: list[dict[str, float]], path: Path) -> Path:
    """Train and val total / alignment / progress loss per epoch (the seeds' dual_loss_comparison.png)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    epochs = [int(r["epoch"]) + 1 for r in history]
    for ax, split in zip(axes, ("train", "val"), strict=True):
        for key, (color, style) in _STYLE.items():
            values = [r.get(f"{split}/{key}") for r in history]
            if all(v is not None for v in values):
                ax.plot(
                    epochs,
                    values,
                    color=color,
                    linestyle=style,
                    marker="o",
                    ms=3,
                    label=key.replace("_", " "),
                )
        ax.set(title=f"{split} losses", xlabel="epoch", ylabel="loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_progress_curves(curves: list[ActionCurve], path: Path, title: str = "") -> Path:
    """Predicted vs true action progress for a few test actions, with the linear-ramp baseline."""
    n = max(len(curves), 1)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, c in zip(axes.flat, curves, strict=False):
        t = range(1, len(c.truth) + 1)
        ax.plot(t, c.truth, color="black", label="true")
        ax.plot(t, c.predicted, color="tab:red", label="predicted")
        ax.plot(t, c.ramp, color="gray", linestyle=":", label="ramp baseline")
        ax.set(title=f"{c.video} / {c.action}", xlabel="frame in action", ylim=(-0.05, 1.05))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(curves) :]:
        ax.axis("off")
    axes.flat[0].legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_calibration(calibration: dict[str, Any], path: Path, title: str = "") -> Path:
    """Mean predicted vs true progress over relative position in the action (the evaluator's
    `calibration` table), with the constant-0.5 and ramp baselines: where a head stuck near 0.5 fails
    shows at the left end even when its OGPE looks acceptable."""
    low, high = np.asarray(calibration["bin_low"]), np.asarray(calibration["bin_high"])
    centre = (low + high) / 2

    def values(key: str) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in calibration[key]], dtype=float)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(centre, values("true"), color="black", marker="o", ms=4, label="true")
    ax.plot(centre, values("predicted"), color="tab:red", marker="o", ms=4, label="predicted")
    ax.plot(centre, values("ramp"), color="gray", linestyle=":", marker=".", label="ramp baseline")
    ax.plot(centre, values("const"), color="tab:blue", linestyle="--", label="constant 0.5 baseline")
    ax.set(
        xlabel="relative position in the action (bin centre)",
        ylabel="mean progress over actions",
        xlim=(0, 1),
        ylim=(-0.05, 1.05),
    )
    ax.set_xticks(np.linspace(0, 1, len(low) + 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
