"""VAVA: optimal-transport video alignment with a virtual frame and temporal priors (Liu et al., CVPR 2022),
as used by the GTCC release, with the release's defects fixed (see `vava_loss`).

Per ordered pair (X: N frames, Y: M frames), i != j, on the (N+1, M+1) Euclidean cost whose row/column 0
is a virtual frame at constant cost `zeta`:
    T = Sinkhorn(cost, reg=N, fixed iterations), uniform marginals
    loss = distance(T) - lambda1 (N+M) I(T) + lambda2 (N M / 4) KL(T || P) + gamma (C(X) + C(Y) + C(X, Y))
with I the inverse-difference-moment of T under the consistency/optimality priors, P the phi-mix of the
two Gaussian priors, C the CIDM regulariser and C(X, Y) the cost of mutual-max minus mutual-min cells.
All pairs run at once, padded to the longest video with masks.
"""

from __future__ import annotations

import math

import torch

from core.losses.lav import compute_dtype, contrastive_idm
from core.losses.pairs import ordered_pairs, pad_sequences

DISTANCES = ("constant", "transport")
KL_EPS = 1e-8  # the fork's value (the release used 1e-5)


def vava_phi(epoch: int) -> float:
    """Weight of the consistency prior vs the optimality prior: decays by epoch, clipped to [1e-3, 0.999]."""
    return min(max(0.999 ** (epoch + 1), 0.001), 0.999)


def sinkhorn_plan(
    cost: torch.Tensor, row_real: torch.Tensor, col_real: torch.Tensor, reg: torch.Tensor, iters: int
) -> torch.Tensor:
    """Entropic transport plan (P, N, M) between uniform marginals over each pair's real rows/columns.

    The release's iteration (u starts uniform, v = b / K^T u, u = a / K v, a fixed number of steps: its
    stopping test compares sum(T) with a vector and never fires), run on log-scalings: identical in
    exact arithmetic, but when the real cells of K underflow (large distances vs reg) the scalings grow
    geometrically and the plain form overflows to NaN gradients within 20 steps. Padded lines are masked.
    """
    real = row_real[:, :, None] & col_real[:, None, :]  # (P, N, M)
    log_k = -cost / reg[:, None, None]  # (P, N, M)
    # log of the uniform marginals; 0 (not log 0) on padded lines keeps every gradient finite
    log_a = torch.where(row_real, -torch.log(row_real.sum(1, keepdim=True).to(cost.dtype)), 0.0)  # (P, N)
    log_b = torch.where(col_real, -torch.log(col_real.sum(1, keepdim=True).to(cost.dtype)), 0.0)  # (P, M)
    # Masked-out cells are -inf on real lines; padded lines see finite zeros (their result is unused).
    fill_rows = torch.where(row_real[:, :, None], -math.inf, 0.0)  # reduce over columns
    fill_cols = torch.where(col_real[:, None, :], -math.inf, 0.0)  # reduce over rows
    log_u = log_a
    for _ in range(iters):
        scores = torch.where(real, log_k + log_u[:, :, None], fill_cols)
        log_v = log_b - torch.logsumexp(scores, dim=1)
        scores = torch.where(real, log_k + log_v[:, None, :], fill_rows)
        log_u = log_a - torch.logsumexp(scores, dim=2)
    return torch.where(real, torch.exp(log_u[:, :, None] + log_k + log_v[:, None, :]), 0.0)


def _gaussian(x: torch.Tensor, delta: float) -> torch.Tensor:
    """N(0, delta^2) density (the release multiplied by sqrt(2 pi) instead of dividing)."""
    return torch.exp(-(x**2) / (2 * delta**2)) / (delta * math.sqrt(2 * math.pi))


def vava_loss(
    sequences: list[torch.Tensor],
    *,
    epoch: int = 0,
    zeta: float = 0.5,
    delta: float = 0.6,
    lambda1: float = 1.0,
    lambda2: float = 0.1,
    gamma: float = 0.5,
    sinkhorn_iters: int = 20,
    distance: str = "constant",
) -> torch.Tensor:
    """VAVA loss of one batch of (T_i, D) embeddings: sum over ordered pairs i != j (scalar).

    Fixed vs the release: lambda1/lambda2 are scaled per pair from their base values (the release
    compounded them across pairs, reaching 1e13), the Gaussian priors divide by sqrt(2 pi), no hard-coded
    device, KL epsilon 1e-8. `distance`: "constant" (default, the release's and fork's
    `1e6 * sum(T) / ((N+1)(M+1))`, which is ~constant since T sums to 1) or "transport" (the real
    transport cost `sum(T * cost)`).
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    x, _, lengths = pad_sequences(sequences)  # (B, T, D), _, (B,)
    x = x.to(compute_dtype(x))
    batch, t, _ = x.shape
    if batch < 2:
        return x.sum() * 0.0  # no pair: zero that still belongs to the graph
    first, second = ordered_pairs(batch, include_self=False, device=x.device)
    n = lengths[first].to(x.dtype)  # (P,) real frames of X
    m = lengths[second].to(x.dtype)  # (P,) real frames of Y
    phi = vava_phi(epoch)

    cost = torch.cdist(x[first], x[second])  # (P, T, T)
    cost = torch.nn.functional.pad(cost, (1, 0, 1, 0), value=zeta)  # (P, T+1, T+1): virtual frame at 0
    idx = torch.arange(t + 1, device=x.device)
    row_real = idx[None, :] <= lengths[first][:, None]  # (P, T+1), virtual row included
    col_real = idx[None, :] <= lengths[second][:, None]  # (P, T+1)
    real = row_real[:, :, None] & col_real[:, None, :]  # (P, T+1, T+1)
    plan = sinkhorn_plan(cost, row_real, col_real, reg=n, iters=sinkhorn_iters)  # (P, T+1, T+1)

    # Priors over the (N+1, M+1) grid, normalised positions i/(N+1), j/(M+1).
    rows_n, cols_m = (n + 1)[:, None, None], (m + 1)[:, None, None]  # (P, 1, 1)
    pos = idx.to(x.dtype)
    diag_norm = torch.sqrt(1 / rows_n**2 + 1 / cols_m**2)  # (P, 1, 1)
    off_diagonal = pos[None, None, :] / cols_m - pos[None, :, None] / rows_n  # (P, T+1, T+1)
    with torch.no_grad():
        # Offsets of each row's / column's best match; both divided by N+1 as in the release.
        held = plan.masked_fill(~real, -1.0)
        row_offset = (pos - held.argmax(dim=2)) / rows_n[:, :, 0]  # (P, T+1)
        col_offset = (pos - held.argmax(dim=1)) / rows_n[:, :, 0]  # (P, T+1)
    consistency_dist = off_diagonal.abs() / diag_norm
    optimality_dist = (col_offset.abs()[:, None, :] + row_offset.abs()[:, :, None]) / (2 * diag_norm)
    prior = phi * _gaussian(consistency_dist, delta) + (1 - phi) * _gaussian(optimality_dist, delta)

    consistency_idm = 1 / (off_diagonal**2 + 1)
    optimality_idm = 1 / (0.5 * (col_offset[:, None, :] ** 2 + row_offset[:, :, None] ** 2) + 1)
    idm = (plan * (phi * consistency_idm + (1 - phi) * optimality_idm)).sum(dim=(1, 2))  # (P,)
    kl = torch.where(real, plan * torch.log((plan + KL_EPS) / (prior + KL_EPS)), 0.0).sum(dim=(1, 2))

    with torch.no_grad():
        # Cells that are the max (min) of both their row and their column.
        top_row = plan.masked_fill(~real, -math.inf).amax(dim=2, keepdim=True)
        top_col = plan.masked_fill(~real, -math.inf).amax(dim=1, keepdim=True)
        low_row = plan.masked_fill(~real, math.inf).amin(dim=2, keepdim=True)
        low_col = plan.masked_fill(~real, math.inf).amin(dim=1, keepdim=True)
        mutual_max = real & (plan == top_row) & (plan == top_col)
        mutual_min = real & (plan == low_row) & (plan == low_col)
    cross = (torch.where(mutual_max, cost, 0.0) - torch.where(mutual_min, cost, 0.0)).sum(dim=(1, 2))

    if distance == "constant":
        dist = 1e6 * plan.sum(dim=(1, 2)) / ((n + 1) * (m + 1))
    else:
        dist = (plan * cost).sum(dim=(1, 2))
    pair_loss = dist - lambda1 * (n + m) * idm + lambda2 * (n * m / 4) * kl + gamma * cross  # (P,)
    # every video is one of the two videos of 2 * (B - 1) ordered pairs
    intra = contrastive_idm(x, lengths).sum() * (2 * (batch - 1))
    return pair_loss.sum() + gamma * intra
