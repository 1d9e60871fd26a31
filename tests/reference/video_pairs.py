"""Slow, obviously-correct references for the video family's pair sampling and gathering (loops only)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from core.data.clips import VideoClip


def pair_pmf(lengths: Sequence[int], k_max: int, gap_decay: float) -> dict[tuple[int, int, int], float]:
    """Exact probability of every (video, t, k): video ~ T-1, k ~ exp(-gap_decay (k-1)) truncated at
    min(k_max, T-1), t uniform over 0..T-1-k."""
    total_steps = sum(max(n - 1, 0) for n in lengths)
    pmf = {}
    for v, n in enumerate(lengths):
        if n < 2:
            continue
        p_video = (n - 1) / total_steps
        gaps = range(1, min(k_max, n - 1) + 1)
        norm = sum(math.exp(-gap_decay * (k - 1)) for k in gaps)
        for k in gaps:
            p_gap = math.exp(-gap_decay * (k - 1)) / norm
            for t in range(n - k):
                pmf[(v, t, k)] = p_video * p_gap / (n - k)
    return pmf


def gather_pairs_loop(
    clips: Sequence[VideoClip], video: torch.Tensor, t: torch.Tensor, k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    firsts, seconds = [], []
    for v, start, gap in zip(video.tolist(), t.tolist(), k.tolist(), strict=True):
        frames = clips[v].frames
        firsts.append(torch.tensor(frames[start], dtype=torch.float32).permute(2, 0, 1) / 255)
        seconds.append(torch.tensor(frames[start + gap], dtype=torch.float32).permute(2, 0, 1) / 255)
    return torch.stack(firsts), torch.stack(seconds)


def pair_labels_loop(clips: Sequence[VideoClip], video: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.tensor(
        [int(clips[v].action_labels[start]) for v, start in zip(video.tolist(), t.tolist(), strict=True)]
    )
