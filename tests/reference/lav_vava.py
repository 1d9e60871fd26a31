"""Loop references for soft-DTW, LAV and VAVA: one pair at a time, unpadded, cell by cell where it matters.

Written for clarity, not speed; the batched code in core.losses is tested and benchmarked against these.
"""

from __future__ import annotations

import math

import torch


def soft_dtw_reference(cost: torch.Tensor, gamma: float) -> torch.Tensor:
    """Soft-DTW of one (N, M) cost matrix by the O(NM) double loop, true infinities on the border."""
    n, m = cost.shape
    inf = torch.tensor(math.inf, dtype=cost.dtype)
    r = [[inf] * (m + 1) for _ in range(n + 1)]
    r[0][0] = torch.tensor(0.0, dtype=cost.dtype)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            preds = torch.stack((r[i - 1][j - 1], r[i - 1][j], r[i][j - 1]))
            r[i][j] = cost[i - 1, j - 1] - gamma * torch.logsumexp(-preds / gamma, dim=0)
    return r[n][m]


def cidm_reference(x: torch.Tensor, window: int = 15, margin: float = 2.0) -> torch.Tensor:
    """CIDM of one (T, D) video as in the release: hinge outside the window, constant W * margin inside."""
    t = x.shape[0]
    idx = torch.arange(t, dtype=x.dtype)
    weight = (idx[:, None] - idx[None, :]) ** 2 + 1
    inside = (idx[:, None] - idx[None, :]).abs() < window
    dist = torch.cdist(x, x)
    outside_term = (~inside) * weight * torch.relu(margin - dist)
    inside_term = inside * weight * margin
    return (outside_term + inside_term).sum()


def lav_reference(
    sequences: list[torch.Tensor], min_temp: float = 0.1, cr_coefficient: float = 0.01
) -> torch.Tensor:
    """LAV: every ordered pair i != j, soft-DTW on squared Euclidean cost + CIDM of both videos, summed."""
    total = torch.zeros((), dtype=sequences[0].dtype)
    for i, u in enumerate(sequences):
        for j, v in enumerate(sequences):
            if i == j:
                continue
            cost = ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)
            total = total + soft_dtw_reference(cost, min_temp)
            total = total + cr_coefficient * (cidm_reference(u) + cidm_reference(v))
    return total


def sinkhorn_reference(cost: torch.Tensor, reg: float, iters: int) -> torch.Tensor:
    """Plan of the release's Sinkhorn: uniform marginals, u starts uniform, `iters` scaling steps."""
    n, m = cost.shape
    a = torch.full((n,), 1.0 / n, dtype=cost.dtype)
    b = torch.full((m,), 1.0 / m, dtype=cost.dtype)
    kernel = torch.exp(-cost / reg)
    u = a
    for _ in range(iters):
        v = b / (kernel.T @ u)
        u = a / (kernel @ v)
    return u[:, None] * kernel * v[None, :]


def vava_pair_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    phi: float,
    zeta: float,
    delta: float,
    lambda1: float,
    lambda2: float,
    gamma: float,
    sinkhorn_iters: int,
    distance: str,
) -> torch.Tensor:
    """VAVA loss of one ordered pair, following the release's steps with its defects fixed."""
    n, m = x.shape[0], y.shape[0]
    rows, cols = n + 1, m + 1
    cost = torch.full((rows, cols), zeta, dtype=x.dtype)
    cost = torch.cat((cost[:1, :], torch.cat((cost[1:, :1], torch.cdist(x, y)), dim=1)), dim=0)
    plan = sinkhorn_reference(cost, reg=n, iters=sinkhorn_iters)

    i = torch.arange(rows, dtype=x.dtype)[:, None].expand(rows, cols)
    j = torch.arange(cols, dtype=x.dtype)[None, :].expand(rows, cols)
    best_col_of_row = plan.argmax(dim=1).to(x.dtype)  # (rows,)
    best_row_of_col = plan.argmax(dim=0).to(x.dtype)  # (cols,)
    row_off = (i - best_col_of_row[:, None]) / rows
    col_off = (j - best_row_of_col[None, :]) / rows  # the release divides by N+1 here too
    norm = math.sqrt(1 / rows**2 + 1 / cols**2)

    def gauss(d: torch.Tensor) -> torch.Tensor:
        return torch.exp(-(d**2) / (2 * delta**2)) / (delta * math.sqrt(2 * math.pi))

    lc = (j / cols - i / rows).abs() / norm
    lo = (col_off.abs() + row_off.abs()) / (2 * norm)
    prior = phi * gauss(lc) + (1 - phi) * gauss(lo)

    consistency = 1 / ((j / cols - i / rows) ** 2 + 1)
    optimality = 1 / (0.5 * (col_off**2 + row_off**2) + 1)
    idm = phi * (plan * consistency).sum() + (1 - phi) * (plan * optimality).sum()
    kl = (plan * torch.log((plan + 1e-8) / (prior + 1e-8))).sum()

    values = plan.tolist()
    row_max, col_max = plan.amax(dim=1).tolist(), plan.amax(dim=0).tolist()
    row_min, col_min = plan.amin(dim=1).tolist(), plan.amin(dim=0).tolist()
    cross = torch.zeros((), dtype=x.dtype)
    for r in range(rows):
        for c in range(cols):
            if values[r][c] == row_max[r] and values[r][c] == col_max[c]:
                cross = cross + cost[r, c]
            if values[r][c] == row_min[r] and values[r][c] == col_min[c]:
                cross = cross - cost[r, c]

    dist = 1e6 * plan.sum() / (rows * cols) if distance == "constant" else (plan * cost).sum()
    vava = dist - lambda1 * (n + m) * idm + lambda2 * (n * m / 4.0) * kl
    return vava + gamma * (cidm_reference(x) + cidm_reference(y) + cross)


def vava_reference(
    sequences: list[torch.Tensor],
    epoch: int = 0,
    zeta: float = 0.5,
    delta: float = 0.6,
    lambda1: float = 1.0,
    lambda2: float = 0.1,
    gamma: float = 0.5,
    sinkhorn_iters: int = 20,
    distance: str = "constant",
) -> torch.Tensor:
    """VAVA: every ordered pair i != j, base lambdas scaled per pair (no compounding), summed."""
    phi = min(max(0.999 ** (epoch + 1), 0.001), 0.999)
    total = torch.zeros((), dtype=sequences[0].dtype)
    for i, x in enumerate(sequences):
        for j, y in enumerate(sequences):
            if i == j:
                continue
            total = total + vava_pair_reference(
                x,
                y,
                phi=phi,
                zeta=zeta,
                delta=delta,
                lambda1=lambda1,
                lambda2=lambda2,
                gamma=gamma,
                sinkhorn_iters=sinkhorn_iters,
                distance=distance,
            )
    return total
