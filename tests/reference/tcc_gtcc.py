"""Slow, obviously-correct loop references for the TCC and GTCC losses (used by tests and benchmarks).

Straight ports of the release's per-pair loops with the project's fixes (see core/losses/tcc.py and
core/losses/gtcc.py): GTCC fits each anchor's alpha row on its own with torch.optim.LBFGS and autograd, and
loops over pairs and anchors in Python. The anchors and window directions come from the same sampler as the
fast path, so the same generator state gives the same random choices.
"""

from __future__ import annotations

import math

import torch

from core.losses.gtcc import DROP_STD_EPS, RECIPROCAL_EPS, sample_anchors
from core.losses.tcc import VAR_EPS


def tcc_loss_loop(
    sequences: list[torch.Tensor], *, softmax_temp: float = 0.1, alignment_variance: float = 0.001
) -> torch.Tensor:
    """TCC over every ordered pair (self-pair included), each summed over frames, total / B^2."""
    total = 0.0
    for u in sequences:
        idx = torch.arange(u.shape[0], dtype=u.dtype)
        for v in sequences:
            alpha = torch.softmax(-torch.cdist(u, v) / softmax_temp, dim=1)
            snn = alpha @ v
            beta = torch.softmax(-torch.cdist(snn, u) / softmax_temp, dim=1)
            mu = beta @ idx
            var = (beta * (idx[None, :] - mu[:, None]) ** 2).sum(1) + VAR_EPS
            total = total + ((idx - mu) ** 2 / var + alignment_variance * torch.log(torch.sqrt(var))).sum()
    return total / len(sequences) ** 2


def gmm_objective(
    p: torch.Tensor, means: torch.Tensor, variances: torch.Tensor, logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The release's symmetric KL between p (M,) and its discretised mixture; also (components, weights)."""
    frames = p.shape[0]
    idx = torch.arange(frames, dtype=p.dtype)
    stds = torch.sqrt(torch.clamp(variances, 0.5))[:, None]
    mus = torch.clamp(means, 0, frames - 1)[:, None]
    density = torch.exp(-0.5 * ((idx - mus) / stds) ** 2) / (stds * math.sqrt(2 * math.pi))
    components = density / density.sum(1, keepdim=True)  # (K, M)
    weights = torch.softmax(logits, 0)
    q = weights @ components
    log_q, log_p = torch.log(q + 1e-30), torch.log(p + 1e-30)
    value = (p * (log_p - log_q)).sum() + (q * (log_q - log_p)).sum()
    return value, components, weights


def fit_gmm_loop(p: torch.Tensor, n_components: int, max_iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's LBFGS fit of one distribution p (M,); non-finite fits give a moment-matched Gaussian."""
    p = p.detach()
    frames, k = p.shape[0], n_components
    means = torch.tensor([1 + i * (frames - 2) / k for i in range(k)], dtype=p.dtype, requires_grad=True)
    variances = torch.tensor([float(frames)] * k, dtype=p.dtype, requires_grad=True)
    logits = torch.ones(k, dtype=p.dtype, requires_grad=True)
    optimiser = torch.optim.LBFGS(
        [means, variances, logits], lr=0.5, history_size=10, max_iter=4, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        value = gmm_objective(p, means, variances, logits)[0]
        value.backward()
        return value

    for _ in range(max_iters):
        optimiser.step(closure)
    with torch.no_grad():
        value, components, weights = gmm_objective(p, means, variances, logits)
        params = torch.cat([means, variances, logits])
        if not (torch.isfinite(value) and torch.isfinite(params).all()):
            idx = torch.arange(frames, dtype=p.dtype)
            mean = (p * idx).sum()
            var = (p * (idx - mean) ** 2).sum()
            _, components, weights = gmm_objective(
                p, mean.repeat(k), var.repeat(k), torch.zeros(k, dtype=p.dtype)
            )
    return components, weights


def gtcc_loss_loop(
    sequences: list[torch.Tensor],
    dropouts: list[torch.Tensor] | None,
    *,
    n_components: int,
    gamma: float,
    delta: float,
    softmax_temp: float = 0.1,
    alignment_variance: float = 0.0,
    max_gmm_iters: int = 8,
    epoch: int = 0,
    n_anchors: int = 20,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """GTCC, one pair and one anchor at a time; mean over all (pair, anchor) terms."""
    lengths = torch.tensor([s.shape[0] for s in sequences])
    sample = sample_anchors(lengths, n_anchors, generator=generator)
    drop_min = gamma ** (epoch + 1)
    terms = []
    for i, u in enumerate(sequences):
        n = u.shape[0]
        idx = torch.arange(n, dtype=u.dtype)
        width = max(1, round(n * delta))
        shift = width if bool(sample.backward[i]) else 0
        anchors = sample.anchors[i][sample.anchor_mask[i]].tolist()
        for j, v in enumerate(sequences):
            if i == j:
                continue
            dist = torch.cdist(u, v)
            if gamma < 1:
                score = u @ dropouts[j][:-1] + dropouts[j][-1]
                mean = score.mean()
                std = (((score - mean) ** 2).sum() / max(n - 1, 1)).clamp_min(DROP_STD_EPS**2).sqrt()
                keep = drop_min + (1 - drop_min) * torch.sigmoid((score - mean) / std)
            for a in anchors:
                alpha = torch.softmax(-dist[a].detach() / softmax_temp, dim=0)
                components, weights = fit_gmm_loop(alpha, n_components, max_gmm_iters)
                snn = components @ v  # (K, D)
                allowed = torch.tensor(
                    [
                        (a - shift <= c < a + width - shift)
                        or (a < width and c < width)
                        or (a >= n - width and c >= n - width)
                        for c in range(n)
                    ]
                )
                logits = (-torch.cdist(snn, u) / softmax_temp).masked_fill(~allowed, float("-inf"))
                beta = torch.softmax(logits, dim=1)  # (K, N)
                mu = beta @ idx
                error = (a - mu) ** 2
                if alignment_variance > 0:
                    var = (beta * (idx[None, :] - mu[:, None]) ** 2).sum(1) + VAR_EPS
                    error = error + alignment_variance * torch.log(torch.sqrt(var))
                align = weights @ error
                if gamma < 1:
                    align = keep[a] * align + (1 - keep[a]) / align.clamp_min(RECIPROCAL_EPS)
                terms.append(align)
    return torch.stack(terms).mean()
