"""Plots of the slots family: slot masks over a clip, and losses / segmentation metrics per epoch."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from core.atomic import atomic_write_bytes

_LOSS_COLOURS = {"total_loss": "tab:blue", "featrec_loss": "tab:green", "contrastive_loss": "tab:red"}


def _save(fig: plt.Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _colours(n: int) -> np.ndarray:
    """n distinct RGB colours in [0, 1] (n, 3)."""
    cmap = plt.get_cmap("tab20" if n > 10 else "tab10")
    return np.array([cmap(i % cmap.N)[:3] for i in range(n)])


def plot_slot_masks(
    frames: torch.Tensor,
    masks: torch.Tensor,
    true_masks: torch.Tensor | None,
    path: Path,
    title: str = "",
    max_videos: int = 2,
) -> Path:
    """For each of the first `max_videos` clips, one column per frame and the rows: the frame, the frame
    coloured by its most likely slot, the ground truth (when given), then every slot's soft mask.

    frames (B, T, 3, H, W) in [0, 1]; masks (B, T, K, H, W) summing to 1 over K; true_masks (B, T, h, w)."""
    n_videos, n_frames, n_slots = min(len(frames), max_videos), frames.shape[1], masks.shape[2]
    head = ["frame", "slots"] + (["truth"] if true_masks is not None else [])
    rows = [*head, *(f"slot {k}" for k in range(n_slots))]
    colours = _colours(n_slots)
    fig, axes = plt.subplots(
        n_videos * len(rows), n_frames, figsize=(1.3 * n_frames, 1.3 * n_videos * len(rows)), squeeze=False
    )
    for v in range(n_videos):
        images = frames[v].permute(0, 2, 3, 1).clamp(0, 1).numpy()  # (T, H, W, 3)
        labels = masks[v].argmax(dim=1).numpy()  # (T, H, W)
        for t in range(n_frames):
            panels = [images[t], np.clip(0.4 * images[t] + 0.6 * colours[labels[t]], 0, 1)]
            if true_masks is not None:
                truth = true_masks[v, t].numpy()
                panels.append(_colours(int(truth.max()) + 1)[truth] * (truth > 0)[..., None])
            panels += [masks[v, t, k].numpy() for k in range(n_slots)]
            for r, panel in enumerate(panels):
                ax = axes[v * len(rows) + r, t]
                ax.imshow(panel, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if t == 0:
                    ax.set_ylabel(rows[r], fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_slots_history(history: list[dict[str, float]], path: Path) -> Path:
    """Train/val losses and the validation segmentation metrics per epoch."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    epochs = [int(r["epoch"]) + 1 for r in history]
    for split, style in (("train", "-"), ("val", "--")):
        for key, colour in _LOSS_COLOURS.items():
            values = [r.get(f"{split}/{key}", np.nan) for r in history]
            left.plot(epochs, values, color=colour, linestyle=style, marker="o", ms=3, label=f"{split} {key}")
    left.set(title="losses", xlabel="epoch", yscale="log")
    for key, colour in (("fg_ari", "tab:purple"), ("video_ari", "tab:orange"), ("mbo", "tab:brown")):
        values = [r.get(f"val/{key}", np.nan) for r in history]
        right.plot(epochs, values, color=colour, marker="o", ms=3, label=f"val {key}")
    right.set(title="segmentation (val)", xlabel="epoch", ylim=(-0.1, 1.0))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
