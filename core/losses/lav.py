"""LAV: "Learning by Aligning Videos in Time" (Haresh et al., CVPR 2021), as used by the GTCC release.

Per ordered pair (U, V), i != j: soft-DTW(gamma = min_temp) on the squared-Euclidean cost between the two
videos plus `cr_coefficient * (C(U) + C(V))`, with C the contrastive inverse-difference-moment (CIDM)
regulariser; plain sum over pairs. Everything runs batched over all pairs (padding + masks).
"""

from __future__ import annotations

import torch

from core.losses.pairs import ordered_pairs, pad_sequences
from core.losses.soft_dtw import soft_dtw

CIDM_WINDOW = 15  # frames closer than this are "neighbours" (the release's sigma)
CIDM_MARGIN = 2.0  # hinge margin on the Euclidean distance of non-neighbours


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """At least float32: soft-DTW and Sinkhorn accumulate over hundreds of steps (AMP gives half)."""
    return torch.promote_types(x.dtype, torch.float32)


def contrastive_idm(
    x: torch.Tensor, lengths: torch.Tensor, *, window: int = CIDM_WINDOW, margin: float = CIDM_MARGIN
) -> torch.Tensor:
    """CIDM regulariser of each padded video `x` (B, T, D) over its first `lengths[b]` frames; returns (B,).

    Frames at least `window` apart are pushed beyond `margin` with weight (i - j)^2 + 1. Inside the window
    the release adds the constant `W * margin` (no gradient), not the paper's `D / W` pull term; we keep
    that, so the value matches the release and only the outside-window hinge trains.
    """
    t = x.shape[1]
    idx = torch.arange(t, device=x.device)
    gap = (idx[:, None] - idx[None, :]).abs()  # (T, T)
    weight = gap.to(x.dtype) ** 2 + 1.0  # (T, T)
    inside = gap < window  # (T, T)
    real = idx[None, :] < lengths.to(x.device)[:, None]  # (B, T)
    real_pair = real[:, :, None] & real[:, None, :]  # (B, T, T)
    dist = torch.cdist(x, x)  # (B, T, T); zero-distance gradient is 0, never NaN
    hinge = torch.where(real_pair & ~inside, weight * torch.relu(margin - dist), 0.0)
    constant = torch.where(real_pair & inside, weight * margin, 0.0)
    return (hinge + constant).sum(dim=(1, 2))  # (B,)


def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean cost (P, N, M) of (P, N, D) vs (P, M, D) without a (P, N, M, D) intermediate."""
    sq = (x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :] - 2.0 * x @ y.transpose(1, 2)
    return sq.clamp_min(0.0)  # cancellation can go a hair below 0 for identical frames


def lav_loss(
    sequences: list[torch.Tensor], *, min_temp: float = 0.1, cr_coefficient: float = 0.01
) -> torch.Tensor:
    """LAV loss of one batch of (T_i, D) embeddings: sum over ordered pairs i != j (scalar)."""
    x, _, lengths = pad_sequences(sequences)  # (B, T, D), _, (B,)
    x = x.to(compute_dtype(x))
    batch = x.shape[0]
    if batch < 2:
        return x.sum() * 0.0  # no pair: zero that still belongs to the graph
    first, second = ordered_pairs(batch, include_self=False, device=x.device)
    # soft-DTW is symmetric (its recursion is invariant under transposing the cost), so each unordered
    # pair is solved once and counted twice.
    keep = first < second
    first, second = first[keep], second[keep]
    cost = squared_distances(x[first], x[second])  # (P, T, T)
    alignment = soft_dtw(cost, lengths[first], lengths[second], gamma=min_temp)  # (P,)
    # every video is one of the two videos of 2 * (B - 1) ordered pairs
    regulariser = contrastive_idm(x, lengths).sum() * (2 * (batch - 1))
    return 2.0 * alignment.sum() + cr_coefficient * regulariser
