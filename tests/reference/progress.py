"""Slow loop references for the progress metrics, losses and head, written from the seeds' text.

One deliberate difference from the seed code: background is every label of `is_background`
('0', 'SIL', 'background'); the seed only knew 'SIL' and 'background'.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from core.data.video import is_background
from core.losses.progress import sample_action_segments
from core.models.progress_head import ProgressHead


def _segments(times: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    return list(zip(times["step"], times["start_frame"], times["end_frame"], strict=True))


def true_progress_loop(times: Mapping[str, Any], T: int, definition: str = "release") -> Tensor:
    """Video-level ground truth written frame by frame, segments in order (a later segment overwrites a
    shared boundary frame). "release": the release's get_trueprogress - an action of L frames gets
    linspace(prev, prev + 1/K, L), i.e. prev + i / (L - 1) / K (prev alone if L = 1); background copies
    the frame before its start (0 at the start). "completed_frames": (j + (i + 1) / L) / K on disjoint
    segments, background holds the frame before."""
    actions = [seg for seg in _segments(times) if not is_background(seg[0])]
    K = len(actions)
    gt = torch.zeros(T, dtype=torch.float64)
    j = 0
    for step, start, end in _segments(times):
        L = end - start + 1
        held = float(gt[start - 1]) if start > 0 else 0.0
        for i in range(L):
            t = start + i
            if is_background(step):
                gt[t] = held if definition == "release" else (gt[t - 1] if t > 0 else 0.0)
            elif definition == "release":
                gt[t] = (j + (i / (L - 1) if L > 1 else 0.0)) / K
            else:
                gt[t] = (j + (i + 1) / L) / K
        if not is_background(step):
            j += 1
    return gt


def true_progress_per_action_loop(times: Mapping[str, Any], T: int) -> Tensor:
    gt = torch.zeros(T, dtype=torch.float64)
    for step, start, end in _segments(times):
        L = end - start + 1
        for i in range(L):
            gt[start + i] = 0.0 if is_background(step) else (i + 1) / L
    return gt


def cumulative_distance_loop(embeddings: Tensor) -> Tensor:
    values = [embeddings.new_zeros(())]
    for t in range(1, embeddings.shape[0]):
        values.append(values[-1] + torch.linalg.norm(embeddings[t] - embeddings[t - 1]))
    return torch.stack(values)


def seed_action_progress(features: Tensor, time_dict: Mapping[str, Any]) -> Tensor:
    """Port of the seed's get_normalized_predicted_progress_action (training normalisation)."""
    T = features.shape[0]
    pred = torch.zeros(T, dtype=features.dtype)
    for step, start, end in _segments(time_dict):
        start = max(0, min(start, T - 1))
        end = max(0, min(end, T - 1))
        if is_background(step):
            pred[start : end + 1] = 0
        else:
            segment = features[start : end + 1]
            if segment.shape[0] < 2:
                pred[start : end + 1] = 0.5
            else:
                cum = cumulative_distance_loop(segment)
                max_val = cum[-1]
                if max_val > 0:
                    pred[start : end + 1] = cum / max_val
                else:
                    pred[start : end + 1] = torch.linspace(0, 1, end - start + 1, dtype=features.dtype)
    return pred


def action_progress_normalised_loop(
    features: Tensor, times: Mapping[str, Any], normalisers: Mapping[str, float]
) -> Tensor:
    """Evaluation variant: each action's cumulative distance over that action's training normaliser."""
    pred = torch.zeros(features.shape[0], dtype=features.dtype)
    for step, start, end in _segments(times):
        if not is_background(step):
            pred[start : end + 1] = cumulative_distance_loop(features[start : end + 1]) / normalisers[step]
    return pred


def ogpe_loop(preds: Sequence[Tensor], gts: Sequence[Tensor]) -> float:
    per_video = []
    for p, g in zip(preds, gts, strict=True):
        per_video.append(sum(abs(float(g[t]) - float(p[t])) for t in range(len(p))) / len(p))
    return sum(per_video) / len(per_video)


def seed_head_forward(head: ProgressHead, segment: Tensor) -> Tensor:
    """The seed's single-segment ProgressHead.forward (fixes A/B as in progress-head-fixes.md)."""
    T = segment.shape[0]
    x = segment
    if head.position_encoding:
        positions = torch.arange(T, dtype=segment.dtype) / max(T, 1)
        x = torch.cat([x, positions.unsqueeze(1)], dim=1)  # (T, D+1)
    if head.use_gru:
        _, h_n = head.gru(x.unsqueeze(0), head.h0)  # h0 None -> zeros
        return head.fc(h_n.reshape(-1)).reshape(())
    return head.fc(x.mean(dim=0)).reshape(())


def alibi_slopes_paper(n: int) -> list[float]:
    """The ALiBi paper's recipe, recursively: 2^(-8i/n) for a power of two n, else the power of two
    below n plus every other slope of twice that power."""
    if math.log2(n).is_integer():
        return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]
    below = 2 ** math.floor(math.log2(n))
    return alibi_slopes_paper(below) + alibi_slopes_paper(2 * below)[0::2][: n - below]


def _transformer_loop(head: ProgressHead, x: Tensor) -> Tensor:
    """Frame-by-frame, head-by-head causal attention with the ALiBi bias -m (i - j): (T, in) -> (T, C)."""
    tf = head.transformer
    h = tf.proj(x)
    T = h.shape[0]
    for block in tf.blocks:
        n_heads = block.n_heads
        slopes = alibi_slopes_paper(n_heads)
        C = h.shape[1]
        d = C // n_heads
        q, k, v = block.qkv(block.norm1(h)).split(C, dim=1)  # (T, C) each
        rows = []
        for i in range(T):
            per_head = []
            for a in range(n_heads):
                sl = slice(a * d, (a + 1) * d)
                scores = torch.stack(
                    [q[i, sl] @ k[j, sl] / math.sqrt(d) - slopes[a] * (i - j) for j in range(i + 1)]
                )
                weights = torch.softmax(scores, dim=0)
                per_head.append(sum(weights[j] * v[j, sl] for j in range(i + 1)))
            rows.append(torch.cat(per_head))
        h = h + block.out(torch.stack(rows))
        h = h + block.ff(block.norm2(h))
    return tf.norm(h)


def _dilated_conv_loop(head: ProgressHead, x: Tensor) -> Tensor:
    """Each layer: h[t] + relu(b + sum_k W[:, :, k] h[t - (K-1-k) d]), frames before 0 being 0."""
    conv = head.conv
    h = conv.proj(x)
    T = h.shape[0]
    for layer, d in zip(conv.convs, conv.dilations, strict=True):
        K = layer.weight.shape[2]
        new = []
        for t in range(T):
            acc = layer.bias
            for k in range(K):
                src = t - (K - 1 - k) * d
                if src >= 0:
                    acc = acc + layer.weight[:, :, k] @ h[src]
            new.append(h[t] + torch.relu(acc))
        h = torch.stack(new)
    return h


def head_forward_loop(head: ProgressHead, segment: Tensor) -> Tensor:
    """Any head on one unpadded segment (T, D) -> scalar, with the head's own weights.

    GRU and mean are the seed's forward; the other kinds are written out frame by frame. Fix B for
    non-GRU heads: the learned start token is the segment's first frame (after fix A's feature)."""
    if head.kind in ("gru", "mean") and head.start_token is None:
        return seed_head_forward(head, segment)
    T = segment.shape[0]
    x = segment
    if head.position_encoding:
        x = torch.cat([x, (torch.arange(T, dtype=segment.dtype) / T).unsqueeze(1)], dim=1)
    if head.start_token is not None:
        x = torch.cat([head.start_token.unsqueeze(0), x])  # (1 + T, in)
    if head.kind == "mean":
        return head.fc(x.mean(dim=0)).reshape(())
    feats = _transformer_loop(head, x) if head.kind == "transformer" else _dilated_conv_loop(head, x)
    return head.fc(feats[-1]).reshape(())


def predict_online_loop(head: ProgressHead, action: Tensor) -> Tensor:
    """Evaluation as the seeds do it: prefix t of the action fed alone for every t; delta heads sum."""
    per_prefix = torch.stack([head_forward_loop(head, action[: t + 1]) for t in range(action.shape[0])])
    return per_prefix.cumsum(0).clamp(0.0, 1.0) if head.delta_output else per_prefix


def learnable_progress_loss_loop(
    head: ProgressHead,
    embeddings: Sequence[Tensor],
    times: Sequence[Mapping[str, Any]],
    *,
    k: int = 1,
    min_segment_len: int = 3,
    start: str = "random",
    loss: str = "l1",
    delta_targets: bool = False,
    inverse_weighting: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Seed-style loss: per video, per sample, one head call on the unpadded slice.

    The (action, start, target) draws come from the sampler with the same generator, so both sides
    see the same draws; the slice, ground truth, weight and reduction are recomputed here.
    """
    total = embeddings[0].new_zeros(())
    for emb, t in zip(embeddings, times, strict=True):
        sample = sample_action_segments(
            emb, t, k=k, min_segment_len=min_segment_len, start=start, generator=generator
        )
        if sample is None:
            continue
        losses = []
        for i in range(k):
            a_start = int(sample.action_start[i])
            a_len = int(sample.action_length[i])
            seg_start, target = int(sample.segment_start[i]), int(sample.target_index[i])
            seg = emb[seg_start : target + 1]
            if seg.shape[0] < 2:
                continue
            pred = head_forward_loop(head, seg)
            gt = min(1.0, max(0.0, (target - a_start + 1) / a_len))
            goal = 1.0 / a_len if delta_targets else gt
            err = abs(pred - goal) if loss == "l1" else (pred - goal) ** 2
            if inverse_weighting:
                err = err * min(1.0 / max(gt, 0.05), 20.0)
            losses.append(err)
        if losses:
            total = total + sum(losses) / len(losses)
    return total


def cumulative_l2_loss_loop(
    embeddings: Sequence[Tensor], times: Sequence[Mapping[str, Any]], generator: torch.Generator | None = None
) -> Tensor:
    """Port of the first seed's 'cumulative_l2' branch (draws: video, then frame, from the generator)."""
    video_idx = int(torch.randint(len(embeddings), (), generator=generator))
    features = embeddings[video_idx]
    time_dict = copy.deepcopy(dict(times[video_idx]))
    T = features.shape[0]
    if T < 2:
        return features.new_zeros(())
    frame_idx = int(torch.randint(T, (), generator=generator))
    time_dict["end_frame"] = list(time_dict["end_frame"])
    time_dict["end_frame"][-1] = T - 1
    pred = seed_action_progress(features, time_dict)
    gt = true_progress_per_action_loop(time_dict, T).to(features.dtype)
    return torch.abs(pred[frame_idx] - gt[frame_idx])


def action_position_stats_loop(per_action: Sequence[Sequence[float]], n_bins: int = 10) -> dict[str, Any]:
    """Early / mid / end means, monotonicity and calibration bins, one action and one frame at a time.

    Frame i of an L-frame action sits at i / (L - 1) (1 for L = 1); each statistic is the mean over
    actions of the action's own mean, skipping actions with nothing in the window."""

    def over_actions(cells: list[list[float]]) -> float:
        means = [sum(c) / len(c) for c in cells if c]
        return sum(means) / len(means) if means else float("nan")

    windows = {"early": (0.0, 0.1), "mid": (0.45, 0.55), "end": (0.9, 1.0)}
    cells: dict[str, list[list[float]]] = {k: [] for k in windows}
    bins: list[list[list[float]]] = [[] for _ in range(n_bins)]
    steps: list[list[float]] = []
    for values in per_action:
        L = len(values)
        picked: dict[str, list[float]] = {k: [] for k in windows}
        in_bin: list[list[float]] = [[] for _ in range(n_bins)]
        for i, value in enumerate(values):
            r = i / (L - 1) if L > 1 else 1.0
            for k, (lo, hi) in windows.items():
                if lo <= r <= hi:
                    picked[k].append(float(value))
            in_bin[min(int(r * n_bins), n_bins - 1)].append(float(value))
        for k in windows:
            cells[k].append(picked[k])
        for b in range(n_bins):
            bins[b].append(in_bin[b])
        steps.append([1.0 if values[i + 1] >= values[i] else 0.0 for i in range(L - 1)])
    return {
        **{k: over_actions(cells[k]) for k in windows},
        "monotonicity": over_actions(steps),
        "bins": [over_actions(b) for b in bins],
        "bin_actions": [sum(1 for c in b if c) for b in bins],
    }
