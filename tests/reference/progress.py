"""Slow loop references for the progress metrics, losses and head, written from the seeds' text.

One deliberate difference from the seed code: background is every label of `is_background`
('0', 'SIL', 'background'); the seed only knew 'SIL' and 'background'.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from core.data.video import is_background
from core.losses.progress import sample_action_segments
from core.models.progress_head import ProgressHead


def _segments(times: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    return list(zip(times["step"], times["start_frame"], times["end_frame"], strict=True))


def true_progress_loop(times: Mapping[str, Any], T: int) -> Tensor:
    actions = [seg for seg in _segments(times) if not is_background(seg[0])]
    K = len(actions)
    gt = torch.zeros(T, dtype=torch.float64)
    j = 0
    for step, start, end in _segments(times):
        L = end - start + 1
        for i in range(L):
            t = start + i
            if is_background(step):
                gt[t] = gt[t - 1] if t > 0 else 0.0
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
            pred = seed_head_forward(head, seg)
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
