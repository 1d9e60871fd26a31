"""Slow, obviously-correct loop references for core.metrics.representation (and the M/P preprocessing)."""

from __future__ import annotations

import math

import torch


def per_pair_mse_loop(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    out = []
    for b in range(pred.shape[0]):
        total, count = 0.0, 0
        for v_pred, v_true in zip(pred[b].flatten().tolist(), target[b].flatten().tolist(), strict=True):
            total += (v_pred - v_true) ** 2
            count += 1
        out.append(total / count)
    return torch.tensor(out, dtype=torch.float64)


def reconstruction_metrics_loop(
    mse: list[float], gaps: list[int], named_gaps: dict[str, int], prefix: str = ""
) -> dict[str, float]:
    def db(m: float) -> float:
        return 10.0 * math.log10(1.0 / max(m, 1e-10))

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else math.nan

    out = {f"{prefix}mse": mean(mse), f"{prefix}psnr": mean([db(m) for m in mse])}
    for name, k in named_gaps.items():
        chosen = [m for m, g in zip(mse, gaps, strict=True) if g == k]
        out[f"{prefix}mse_{name}"] = mean(chosen)
        out[f"{prefix}psnr_{name}"] = mean([db(m) for m in chosen])
    return out


def softmax_probe_loss_loop(
    weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor, l2: float
) -> torch.Tensor:
    """Per sample: logits, log-sum-exp, minus the true logit; averaged; plus l2/2 * sum of squares."""
    n, d = x.shape
    c = weight.shape[1]
    total = torch.zeros((), dtype=weight.dtype)
    for i in range(n):
        logits = [bias[j] + sum(x[i, f] * weight[f, j] for f in range(d)) for j in range(c)]
        top = max(float(v.detach()) for v in logits)
        lse = top + torch.log(sum(torch.exp(v - top) for v in logits))
        total = total + lse - logits[int(y[i])]
    penalty = sum(weight[f, j] ** 2 for f in range(d) for j in range(c))
    return total / n + 0.5 * l2 * penalty


def predict_loop(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> list[int]:
    out = []
    for i in range(x.shape[0]):
        scores = [
            float(bias[j] + sum(x[i, f] * weight[f, j] for f in range(x.shape[1]))) for j in range(len(bias))
        ]
        out.append(max(range(len(scores)), key=lambda j: scores[j]))
    return out


def retrieval_score_loop(
    query_x: torch.Tensor,
    query_y: torch.Tensor,
    db_x: torch.Tensor | None = None,
    db_y: torch.Tensor | None = None,
    k: int = 1,
) -> float:
    def cosine(a: list[float], b: list[float]) -> float:
        dot = sum(u * v for u, v in zip(a, b, strict=True))
        return dot / (math.sqrt(sum(u * u for u in a)) * math.sqrt(sum(v * v for v in b)))

    leave_one_out = db_x is None
    db_x = query_x if leave_one_out else db_x
    db_y = query_y if leave_one_out else db_y
    fractions = []
    for i in range(query_x.shape[0]):
        scored = [
            (cosine(query_x[i].tolist(), db_x[j].tolist()), j)
            for j in range(db_x.shape[0])
            if not (leave_one_out and j == i)
        ]
        scored.sort(key=lambda s: -s[0])
        hits = sum(int(db_y[j]) == int(query_y[i]) for _, j in scored[:k])
        fractions.append(hits / k)
    return sum(fractions) / len(fractions)


LUMA = (0.2126, 0.7152, 0.0722)


def appearance_stream_loop(
    img: torch.Tensor, border: str = "zeros", unbiased_std: bool = True
) -> torch.Tensor:
    """P stream of one image (3, H, W) as the reference computes it: z-score the luminance with the
    unbiased std (+1e-6), clamp to +-3, Sobel with `conv2d(..., padding=1)` (zeros outside the image;
    border="replicate" repeats the border instead), divide by max(largest magnitude, 1e-6)."""
    _, h, w = img.shape
    lum = [[sum(LUMA[c] * float(img[c, i, j]) for c in range(3)) for j in range(w)] for i in range(h)]
    flat = [v for row in lum for v in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((v - mean) ** 2 for v in flat) / (len(flat) - 1 if unbiased_std else len(flat)))
    z = [[min(max((v - mean) / (std + 1e-6), -3.0), 3.0) for v in row] for row in lum]

    def at(i: int, j: int) -> float:
        if border == "zeros":
            return z[i][j] if 0 <= i < h and 0 <= j < w else 0.0
        return z[min(max(i, 0), h - 1)][min(max(j, 0), w - 1)]

    dx = [[0.0] * w for _ in range(h)]
    dy = [[0.0] * w for _ in range(h)]
    for i in range(h):
        for j in range(w):
            dx[i][j] = (
                at(i - 1, j + 1)
                + 2 * at(i, j + 1)
                + at(i + 1, j + 1)
                - at(i - 1, j - 1)
                - 2 * at(i, j - 1)
                - at(i + 1, j - 1)
            )
            dy[i][j] = (
                at(i + 1, j - 1)
                + 2 * at(i + 1, j)
                + at(i + 1, j + 1)
                - at(i - 1, j - 1)
                - 2 * at(i - 1, j)
                - at(i - 1, j + 1)
            )
    peak = max(max(math.hypot(dx[i][j], dy[i][j]) for i in range(h) for j in range(w)), 1e-6)
    out = torch.zeros(5, h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            out[0, i, j] = dx[i][j] / peak
            out[1, i, j] = dy[i][j] / peak
            for c in range(3):
                out[2 + c, i, j] = float(img[c, i, j])
    return out


def motion_stream_loop(img_t: torch.Tensor, img_tk: torch.Tensor) -> torch.Tensor:
    _, h, w = img_t.shape
    out = torch.zeros(4, h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            d = [float(img_tk[c, i, j]) - float(img_t[c, i, j]) for c in range(3)]
            out[0, i, j] = min(max(sum(LUMA[c] * d[c] for c in range(3)), -1.0), 1.0)
            for c in range(3):
                out[1 + c, i, j] = min(max(d[c], -1.0), 1.0)
    return out
