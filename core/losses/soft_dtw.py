"""Batched soft-DTW (Cuturi & Blondel, 2017) over many padded cost matrices at once.

The DP runs as an anti-diagonal wavefront: every cell on the diagonal i + j = d depends only on the two
previous diagonals, so one step is a single vectorised op over (pairs, cells) and the Python loop runs
N + M - 1 times regardless of how many pairs there are. Gradients come from autograd through the
wavefront: each step saves a few (P, N) tensors, so memory stays O(P * N * (N + M)) and no custom backward
is needed.
"""

from __future__ import annotations

import math

import torch


def soft_dtw(cost: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """Soft-DTW value of each padded cost matrix, read at its own lengths.

    `cost` (P, N, M) holds pair p's real costs in `[:rows[p], :cols[p]]`; entries beyond are ignored (the
    DP value at (rows[p], cols[p]) never depends on them, so they also get zero gradient). Returns (P,).
    """
    if gamma <= 0:
        raise ValueError(f"soft-DTW needs gamma > 0, got {gamma}")
    if cost.ndim != 3 or int(rows.min()) < 1 or int(cols.min()) < 1:
        raise ValueError("soft_dtw expects cost (P, N, M) and lengths >= 1")
    n_pairs, n, m = cost.shape
    device = cost.device
    rows, cols = rows.to(device), cols.to(device)

    # Skewed layout: diagonal d (cells with i + j = d, 1-based, border row/col 0) is a vector over i = 0..N.
    i_idx = torch.arange(n + 1, device=device)[None, :]  # (1, N+1)
    d_idx = torch.arange(n + m + 1, device=device)[:, None]  # (N+M+1, 1)
    j_idx = d_idx - i_idx  # (N+M+1, N+1)
    interior = (i_idx >= 1) & (j_idx >= 1) & (j_idx <= m)  # (N+M+1, N+1)
    skewed = cost[:, (i_idx - 1).clamp(0, n - 1), (j_idx - 1).clamp(0, m - 1)]  # (P, N+M+1, N+1)
    skewed = torch.where(interior, skewed, 0.0)

    # A finite stand-in for +inf: larger than any |R| by a margin of 1e3 * gamma, so exp(-(big - R)/gamma)
    # is exactly 0 in float32/64, while -big/gamma stays finite (true infinities give NaN gradients).
    bound = (n + m) * (cost.detach().abs().amax() + gamma * math.log(3.0))
    big = 2.0 * bound + 1e3 * gamma
    border = big.expand(n_pairs, 1)  # (P, 1): R[0, d] for d >= 1

    prev2 = torch.where(i_idx == 0, 0.0, big).expand(n_pairs, n + 1)  # d = 0: R[0, 0] = 0, rest border
    prev1 = big.expand(n_pairs, n + 1)  # d = 1: R[0, 1] and R[1, 0] are borders
    diagonals = [prev2, prev1]
    last = int((rows + cols).max())
    cost_diagonals = skewed.unbind(1)  # one backward op for all steps, not a full-size zero tensor each
    for d in range(2, last + 1):
        # predecessors of R[i, j] for i = 1..N: R[i-1, j-1] (d-2, row i-1), R[i-1, j] and R[i, j-1] (d-1)
        preds = torch.stack((prev2[:, :-1], prev1[:, :-1], prev1[:, 1:]), dim=-1)  # (P, N, 3)
        softmin = -gamma * torch.logsumexp(preds / -gamma, dim=-1)  # (P, N)
        cell = torch.where(interior[d, 1:], cost_diagonals[d][:, 1:] + softmin, big)  # (P, N)
        prev2, prev1 = prev1, torch.cat((border, cell), dim=1)
        diagonals.append(prev1)

    table = torch.stack(diagonals, dim=1)  # (P, last+1, N+1)
    return table[torch.arange(n_pairs, device=device), rows + cols, rows]  # (P,)
