"""Metrics of the video family: reconstruction (MSE, PSNR per gap) and representation quality.

Reconstruction alone can be solved by a shortcut (the decoder sees img_t and patch tokens that carry the
full frame difference), so the encoder's representation is measured directly: a linear probe on frozen
embeddings predicting the action that produced the pair, and nearest-neighbour retrieval of pairs with
the same action. Everything here is vectorised; tests/reference/representation.py holds loop references.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_MIN_MSE = 1e-10  # PSNR of a perfect prediction: 100 dB rather than inf


def per_pair_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each pair: (B, C, H, W) x 2 -> (B,)."""
    return (pred - target).square().flatten(1).mean(1)


def psnr(mse: torch.Tensor, max_value: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of per-pair MSEs (images in [0, max_value])."""
    return 10.0 * torch.log10(max_value**2 / mse.clamp_min(_MIN_MSE))


def reconstruction_metrics(
    mse: torch.Tensor, gaps: torch.Tensor, named_gaps: dict[str, int], prefix: str = ""
) -> dict[str, float]:
    """`mse`, `psnr` (mean of per-pair values) overall and for each named gap (`mse_<name>`, ...).

    mse: (N,) per-pair MSE; gaps: (N,) the pairs' k. A named gap without pairs gives NaN."""
    p = psnr(mse)
    out = {f"{prefix}mse": float(mse.mean()), f"{prefix}psnr": float(p.mean())}
    for name, k in named_gaps.items():
        sel = gaps == k
        n = int(sel.sum())
        out[f"{prefix}mse_{name}"] = float(mse[sel].mean()) if n else math.nan
        out[f"{prefix}psnr_{name}"] = float(p[sel].mean()) if n else math.nan
    return out


def softmax_probe_loss(
    weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor, l2: float
) -> torch.Tensor:
    """Mean cross-entropy of the linear classifier `x @ weight + bias` plus `l2 / 2 * |weight|^2`.

    x: (N, D), y: (N,) labels, weight: (D, C), bias: (C,). Strictly convex for l2 > 0."""
    return F.cross_entropy(x @ weight + bias, y) + 0.5 * l2 * weight.square().sum()


def standardize(train_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Scale every feature to zero mean, unit variance by the training set's statistics (float64)."""
    train_x = train_x.double()
    mean, std = train_x.mean(0), train_x.std(0, unbiased=False) + 1e-8
    return [(x.double() - mean) / std for x in (train_x, *others)]


def fit_linear_probe(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = 1e-3, max_iter: int = 300
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (D, C) and bias (C,) minimising `softmax_probe_loss` by full-batch L-BFGS from zeros.

    Deterministic (no sampling, fixed start) and, the objective being strictly convex, the unique minimum
    up to the solver's tolerance."""
    x = x.double()
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = softmax_probe_loss(weight, bias, x, y, l2)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


def linear_probe_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int | None = None,
    l2: float = 1e-3,
    max_iter: int = 300,
) -> float:
    """Test accuracy of a softmax linear probe fit on frozen, standardised training features.

    train_x: (N, D), train_y: (N,), test_x: (M, D), test_y: (M,)."""
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    train_x, test_x = standardize(train_x, test_x)
    weight, bias = fit_linear_probe(train_x, train_y, num_classes, l2, max_iter)
    return float(((test_x @ weight + bias).argmax(1) == test_y).double().mean())


def majority_accuracy(train_y: torch.Tensor, test_y: torch.Tensor) -> float:
    """Accuracy of always answering the most common training label: the probe's chance level."""
    return float((test_y == torch.bincount(train_y).argmax()).double().mean())


def retrieval_score(
    query_x: torch.Tensor,
    query_y: torch.Tensor,
    db_x: torch.Tensor | None = None,
    db_y: torch.Tensor | None = None,
    k: int = 1,
) -> float:
    """Mean fraction of each query's k nearest database items (cosine similarity) sharing its label.

    query_x: (Q, D), db_x: (M, D). Without a database, the queries search each other, self excluded."""
    q = F.normalize(query_x.double(), dim=1)
    leave_one_out = db_x is None
    db = q if leave_one_out else F.normalize(db_x.double(), dim=1)
    db_y = query_y if leave_one_out else db_y
    sim = q @ db.T  # (Q, M)
    if leave_one_out:
        sim.fill_diagonal_(-math.inf)
    nearest = sim.topk(k, dim=1).indices  # (Q, k)
    return float((db_y[nearest] == query_y[:, None]).double().mean())
