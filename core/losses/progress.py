"""Action-level progress losses: the learnable head's segment loss and the cumulative-L2 loss.

Both follow the seed plans (../seeds/progress-loss-plan.md, learnable-progress-head-plan.md) with
the draws taken from a torch generator, so a resumed run reproduces them, and with the learnable
loss packing every sampled segment of the batch into one head call.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from core.data.video import is_background
from core.metrics.progress import action_cumulative_progress, true_progress_per_action
from core.models.progress_head import ProgressHead, gather_segments  # ProgressHead: re-exported

__all__ = [
    "ProgressHead",
    "SegmentSample",
    "cumulative_l2_progress_loss",
    "learnable_progress_loss",
    "sample_action_segments",
]

# fix E: early frames (small gt) weigh more, capped so that a gt near 0 cannot blow the loss up
_MIN_WEIGHT_GT = 0.05
_MAX_WEIGHT = 20.0


class SegmentSample(NamedTuple):
    """k segments of one video, each running from `segment_start` to `target_index` inclusive.

    `segments` and `targets` live on the embeddings' device; the index tensors stay on the CPU
    (`lengths` feeds pack_padded_sequence, which wants CPU lengths).
    """

    segments: Tensor  # (k, L_max, D), zero-padded after each segment's length
    lengths: Tensor  # (k,) long, target_index - segment_start + 1
    targets: Tensor  # (k,) ground-truth progress of the action at target_index
    actions: list[str]  # (k,) label of the sampled action
    action_start: Tensor  # (k,) long
    action_length: Tensor  # (k,) long
    segment_start: Tensor  # (k,) long, clamped to the video
    segment_end: Tensor  # (k,) long, the drawn segment end (bounds the target)
    target_index: Tensor  # (k,) long, clamped to [segment_start, T-1]


class _Draws(NamedTuple):
    """The integer draws of k samples of one video (numpy int64, (k,) each)."""

    pick: np.ndarray  # segment index of the sampled action
    action_start: np.ndarray
    action_length: np.ndarray
    segment_start: np.ndarray  # clamped to the video
    segment_end: np.ndarray
    target: np.ndarray  # clamped to [segment_start, T-1]


def _uniform_int(u: np.ndarray, lo: np.ndarray | int, hi: np.ndarray | int) -> np.ndarray:
    """U{lo..hi} per element from uniforms u in [0, 1) (the vectorised random.randint)."""
    return np.minimum(lo + np.floor(u * (np.asarray(hi) - lo + 1)).astype(np.int64), hi)


def _draw(
    times: Mapping[str, Any],
    T: int,
    k: int,
    min_segment_len: int,
    start: str,
    generator: torch.Generator | None,
) -> _Draws | None:
    """The seed's nested draws for k samples at once; the index arithmetic runs in numpy because
    the arrays are tiny and per-op torch overhead would dominate the loss."""
    if start not in ("random", "action_start"):
        raise ValueError(f"start must be 'random' or 'action_start', got {start!r}")
    if k < 1 or min_segment_len < 1:
        raise ValueError("k and min_segment_len must be >= 1")
    starts = np.asarray(times["start_frame"], dtype=np.int64).reshape(-1)
    ends = np.asarray(times["end_frame"], dtype=np.int64).reshape(-1)
    lengths = ends - starts + 1
    is_action = np.array([not is_background(s) for s in times["step"]], dtype=bool)
    valid = np.flatnonzero(is_action & (lengths >= min_segment_len))
    if valid.size == 0 or T == 0:
        return None
    # four uniforms per sample, always drawn, so that `start` does not shift the random stream
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(k, 4, generator=generator, dtype=torch.float64, device=gen_device).cpu().numpy()  # (k, 4)
    pick = valid[_uniform_int(u[:, 0], 0, valid.size - 1)]
    a_start, a_end, a_len = starts[pick], ends[pick], lengths[pick]
    if start == "action_start":
        seg_start = a_start
    else:
        seg_start = _uniform_int(u[:, 1], a_start, np.maximum(a_start, a_end - min_segment_len + 1))
    seg_end = _uniform_int(u[:, 2], seg_start + min_segment_len - 1, a_end)
    target = _uniform_int(u[:, 3], seg_start, seg_end)
    seg_start = np.clip(seg_start, 0, T - 1)
    target = np.maximum(seg_start, np.minimum(target, T - 1))
    return _Draws(pick, a_start, a_len, seg_start, seg_end, target)


def _gt(d: _Draws) -> np.ndarray:
    """The seed's ground truth: clip((target - action_start + 1) / action_length, 0, 1)."""
    return np.clip((d.target - d.action_start + 1) / d.action_length, 0.0, 1.0)


def sample_action_segments(
    embeddings: Tensor,
    times: Mapping[str, Any],
    *,
    k: int = 1,
    min_segment_len: int = 3,
    start: str = "random",
    generator: torch.Generator | None = None,
) -> SegmentSample | None:
    """Draw k independent (action, segment, target) triples as in the seed's sampler.

    Valid actions are non-background with at least `min_segment_len` frames; one is picked
    uniformly, then seg_start ~ U{a_start..max(a_start, a_end - m + 1)}, seg_end ~ U{seg_start + m - 1
    ..a_end}, target ~ U{seg_start..seg_end}. `start='action_start'` pins seg_start to the action
    start, as evaluation feeds actions. Returns None when the video has no valid action.
    """
    d = _draw(times, embeddings.shape[0], k, min_segment_len, start, generator)
    if d is None:
        return None
    seg_len = d.target - d.segment_start + 1
    labels = np.asarray([str(s) for s in times["step"]], dtype=object)[d.pick].tolist()
    gt = torch.from_numpy(_gt(d)).to(embeddings.device, embeddings.dtype)
    return SegmentSample(
        gather_segments(embeddings, d.segment_start, seg_len),
        torch.from_numpy(seg_len),
        gt,
        labels,
        *(
            torch.from_numpy(a)
            for a in (d.action_start, d.action_length, d.segment_start, d.segment_end, d.target)
        ),
    )


def _zero_with_graph(embeddings: Sequence[Tensor], head: Any = None) -> Tensor:
    """A 0 that is still part of the graph, so backward() and DDP's reducer see every input."""
    zero = sum((e.sum() * 0.0 for e in embeddings), embeddings[0].new_zeros(()))
    if isinstance(head, torch.nn.Module):
        zero = zero + sum((p.sum() * 0.0 for p in head.parameters()), zero.new_zeros(()))
    return zero


def learnable_progress_loss(
    head: Callable[[Tensor, Tensor], Tensor],
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
    """The learnable-head progress loss over k sampled segments of every video, in one head call.

    Segments shorter than 2 frames are dropped (the seed skips them). Per video the loss is the mean
    over its kept samples, summed over videos: the seed's sum over videos when k = 1. Fix E
    (`inverse_weighting`) weighs each sample by min(1 / max(gt, 0.05), 20); fix D (`delta_targets`)
    regresses the per-frame increment 1 / action_length instead of the progress itself.
    """
    if loss not in ("l1", "l2"):
        raise ValueError(f"loss must be 'l1' or 'l2', got {loss!r}")
    if len(embeddings) != len(times):
        raise ValueError("need one times record per video")
    if len(embeddings) == 0:
        raise ValueError("learnable_progress_loss needs at least one video")
    if getattr(head, "delta_output", delta_targets) != delta_targets:
        raise ValueError("delta_targets must match the head's delta_output")
    draws = [
        (v, _draw(t, e.shape[0], k, min_segment_len, start, generator))
        for v, (e, t) in enumerate(zip(embeddings, times, strict=True))
    ]
    draws = [(v, d) for v, d in draws if d is not None]
    if not draws:
        return _zero_with_graph(embeddings, head)
    first_frame = np.cumsum([0] + [e.shape[0] for e in embeddings])  # offset of each video in `frames`
    seg_start = np.concatenate([first_frame[v] + d.segment_start for v, d in draws])  # (N,)
    lengths = np.concatenate([d.target - d.segment_start + 1 for _, d in draws])
    keep = lengths >= 2
    if not keep.any():
        return _zero_with_graph(embeddings, head)
    frames = torch.cat(list(embeddings))  # (sum T, D): one gather packs every video's segments
    segments = gather_segments(frames, seg_start[keep], lengths[keep])  # (N_keep, L_max, D)
    pred = head(segments, torch.from_numpy(lengths[keep]))  # (N_keep,)
    gt = torch.from_numpy(np.concatenate([_gt(d) for _, d in draws])[keep]).to(pred.device, pred.dtype)
    if delta_targets:
        action_length = np.concatenate([d.action_length for _, d in draws])[keep]
        target = torch.from_numpy(1.0 / action_length).to(pred.device, pred.dtype)
    else:
        target = gt
    video = torch.from_numpy(np.concatenate([np.full(d.target.size, v) for v, d in draws])[keep]).to(
        pred.device
    )
    err = (pred - target).abs() if loss == "l1" else (pred - target) ** 2
    if inverse_weighting:
        err = err * (1.0 / gt.clamp(min=_MIN_WEIGHT_GT)).clamp(max=_MAX_WEIGHT)
    n_videos = len(embeddings)
    per_video = err.new_zeros(n_videos).index_add(0, video, err)
    count = torch.bincount(video, minlength=n_videos).clamp(min=1).to(err.dtype)
    return (per_video / count).sum()


def cumulative_l2_progress_loss(
    embeddings: Sequence[Tensor],
    times: Sequence[Mapping[str, Any]],
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The first seed's cumulative-L2 loss: |pred - gt| at one random frame of one random video.

    pred is the action-level cumulative distance normalised per action (training mode), gt the
    action-level ground truth; the annotation's last segment is stretched to the video's end.
    """
    if len(embeddings) != len(times):
        raise ValueError("need one times record per video")
    if len(embeddings) == 0:
        raise ValueError("cumulative_l2_progress_loss needs at least one video")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    v = int(torch.randint(len(embeddings), (), generator=generator, device=gen_device))
    emb = embeddings[v]  # (T, D)
    T = emb.shape[0]
    if T < 2:
        return _zero_with_graph(embeddings)
    frame = int(torch.randint(T, (), generator=generator, device=gen_device))
    t = copy.deepcopy(dict(times[v]))
    t["end_frame"] = list(t["end_frame"])
    t["end_frame"][-1] = T - 1
    pred = action_cumulative_progress(emb, t)  # (T,)
    gt = true_progress_per_action(t, T, dtype=emb.dtype, device=emb.device)  # (T,)
    return (pred[frame] - gt[frame]).abs()
