"""Progress ground truth, cumulative-L2 progress predictions and OGPE.

A `times` record lists contiguous, temporally ordered segments (`step`, inclusive `start_frame` /
`end_frame`). Everything here turns it into per-frame segment ids with torch ops once per video, so
no function loops over frames. Frames are clamped to the video as the release does, except that a
segment starting beyond the last frame is dropped instead of collapsing onto it (the loader drops
such segments too); frames no segment covers count as background.

Consecutive segments may share their boundary frame (`end_i == start_{i+1}`), as the release's JSON
stores them: the release writes segments in order, so the later segment owns the shared frame, and
so do the functions here. (The loader reads the JSON as half-open instead, so its records never
share frames.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from core.data.video import is_background


class _FrameSegments(NamedTuple):
    """Per-frame view of a `times` record clipped to a video of T frames."""

    seg_id: Tensor  # (T,) long, segment owning the frame (the later one on a shared frame; 0 if none)
    offset: Tensor  # (T,) long, frame index inside its segment (0-based)
    length: Tensor  # (T,) long, declared length of the frame's segment (1 where uncovered)
    action: Tensor  # (T,) bool, frame lies in a non-background segment
    actions_before: Tensor  # (T,) long, action segments before the frame's own (all before t if uncovered)
    starts: Tensor  # (S,) long
    lengths: Tensor  # (S,) long
    is_action: Tensor  # (S,) bool
    labels: list[str]  # (S,)


def _frame_segments(
    times: Mapping[str, Any], T: int, device: torch.device | str | None = None
) -> _FrameSegments:
    starts = torch.as_tensor(times["start_frame"], dtype=torch.long, device=device).reshape(-1)
    ends = torch.as_tensor(times["end_frame"], dtype=torch.long, device=device).reshape(-1)
    labels = [str(s) for s in times["step"]]
    keep = (starts <= T - 1) & (ends >= 0) & (ends >= starts)
    if not bool(keep.all()):
        labels = [lab for lab, k in zip(labels, keep.tolist(), strict=True) if k]
        starts, ends = starts[keep], ends[keep]
    starts, ends = starts.clamp(min=0), ends.clamp(max=T - 1)
    if starts.numel() > 1 and not bool(((starts[1:] >= ends[:-1]) & (starts[1:] > starts[:-1])).all()):
        raise ValueError(
            "times segments must be in temporal order and overlap at most by a shared boundary frame"
        )
    lengths = ends - starts + 1
    is_action = torch.tensor([not is_background(lab) for lab in labels], dtype=torch.bool, device=device)
    frame = torch.arange(T, device=device)
    if starts.numel() == 0:
        zeros = torch.zeros(T, dtype=torch.long, device=device)
        return _FrameSegments(
            zeros, zeros, zeros + 1, zeros.bool(), zeros, starts, lengths, is_action, labels
        )
    # the last segment starting at or before t owns t: on a shared frame, the later segment
    seg_id = (torch.searchsorted(starts, frame, right=True) - 1).clamp(min=0)
    covered = (frame >= starts[seg_id]) & (frame <= ends[seg_id])
    action = covered & is_action[seg_id]
    offset = torch.where(covered, frame - starts[seg_id], 0)
    length = torch.where(covered, lengths[seg_id], 1)
    before = torch.cumsum(is_action.long(), 0) - is_action.long()  # (S,) action segments before each
    after_own = before[seg_id] + (is_action[seg_id] & (frame > ends[seg_id])).long()  # uncovered: past it
    actions_before = torch.where(frame < starts[0], 0, after_own)
    return _FrameSegments(seg_id, offset, length, action, actions_before, starts, lengths, is_action, labels)


VIDEO_PROGRESS_GT = ("release", "completed_frames")


def true_progress(
    times: Mapping[str, Any],
    T: int,
    *,
    definition: str = "release",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Video-level ground truth: each of the K actions advances progress by 1/K; background holds it.

    `definition="release"` (default) is the release's `get_trueprogress`, the ground truth behind the
    paper's OPE: an action of L frames is `linspace(prev, prev + 1/K, L)`, so its first frame holds the
    previous value, its last reaches prev + 1/K and a one-frame action stays at prev; background copies
    the frame before it. `"completed_frames"` (this project's earlier reading) counts frame t as done:
    prev + (offset + 1) / (K L). They differ by up to 1/(K L) per frame, enough to move video-level
    OGPE, so a run records which one it used."""
    if definition not in VIDEO_PROGRESS_GT:
        raise ValueError(f"definition must be one of {VIDEO_PROGRESS_GT}, got {definition!r}")
    fs = _frame_segments(times, T, device)
    K = int(fs.is_action.sum())
    if K == 0:
        return torch.zeros(T, dtype=dtype, device=device)
    prev = fs.actions_before.to(dtype)
    if definition == "completed_frames":
        within = torch.where(fs.action, (fs.offset + 1).to(dtype) / fs.length.to(dtype), 0.0)
        return (prev + within) / K  # (T,)
    within = fs.offset.to(dtype) / (fs.length - 1).clamp(min=1).to(dtype)  # linspace(0, 1, L); L = 1: 0
    value = (prev + within) / K  # (T,) right on action frames
    # background: the value of the last action frame before the segment (the release copies the frame
    # before the segment's start, itself a held value if background); 0 before the first action
    frame = torch.arange(T, device=value.device)
    last_action = torch.where(fs.action, frame, -1).cummax(0).values  # (T,)
    held = torch.where(last_action >= 0, value[last_action.clamp(min=0)], 0.0)
    return torch.where(fs.action, value, held)


def true_progress_per_action(
    times: Mapping[str, Any],
    T: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Action-level ground truth: 1/L, 2/L, ..., 1 inside each action of length L; background 0.

    On a record with shared boundary frames, L is the declared length and the later segment owns the
    shared frame, as in the fork's `get_trueprogress_per_action` (an earlier action then stops at
    (L - 1) / L)."""
    fs = _frame_segments(times, T, device)
    return torch.where(fs.action, (fs.offset + 1).to(dtype) / fs.length.to(dtype), 0.0)  # (T,)


def cumulative_distance(embeddings: Tensor) -> Tensor:
    """P[0] = 0, P[t] = P[t-1] + ||u_t - u_{t-1}||: the release's progress signal before normalising."""
    steps = torch.linalg.vector_norm(embeddings[1:] - embeddings[:-1], dim=-1)  # (T-1,)
    return torch.cat([steps.new_zeros(1), steps.cumsum(0)])  # (T,)


def ogpe(pred: Tensor | Sequence[Tensor], gt: Tensor | Sequence[Tensor]) -> float:
    """Online progress error: mean_t |gt_t - pred_t|; for lists, the mean over videos of that mean.

    Averaging per video first (not over all frames) is the paper's definition: long videos must not
    dominate the score.
    """
    if isinstance(pred, Tensor) or isinstance(gt, Tensor):
        pred_t, gt_t = torch.as_tensor(pred), torch.as_tensor(gt)
        if pred_t.shape != gt_t.shape or pred_t.numel() == 0:
            raise ValueError(
                f"ogpe needs equal, non-empty shapes, got {tuple(pred_t.shape)} and {tuple(gt_t.shape)}"
            )
        return float((gt_t.double() - pred_t.double()).abs().mean())
    preds = [torch.as_tensor(p).reshape(-1).double() for p in pred]
    gts = [torch.as_tensor(g).reshape(-1).double() for g in gt]
    if not preds or len(preds) != len(gts):
        raise ValueError("ogpe needs as many predictions as ground truths, at least one")
    sizes = torch.tensor([p.numel() for p in preds])
    if not torch.equal(sizes, torch.tensor([g.numel() for g in gts])) or bool((sizes == 0).any()):
        raise ValueError("ogpe needs per-video predictions and ground truths of equal, non-zero length")
    err = (torch.cat(gts) - torch.cat(preds)).abs()  # (sum T_i,)
    video = torch.repeat_interleave(torch.arange(len(preds)), sizes)
    per_video = torch.zeros(len(preds), dtype=err.dtype).index_add_(0, video, err) / sizes
    return float(per_video.mean())


def action_cumulative_progress(
    embeddings: Tensor, times: Mapping[str, Any], normalisers: Mapping[str, float] | None = None
) -> Tensor:
    """Action-level cumulative-L2 progress: the cumulative distance restarting at each action start.

    With `normalisers=None` (training) each action is divided by its own final distance, with the
    seed's edge cases: background 0, a 1-frame action 0.5, zero final distance -> linspace(0, 1).
    With `normalisers` (evaluation, online) action `a` is divided by `normalisers[a]`, the mean final
    distance of that action over training videos, so frame t needs only frames <= t.
    """
    T = embeddings.shape[0]
    fs = _frame_segments(times, T, embeddings.device)
    S = fs.starts.numel()
    if S == 0 or T == 0:
        return embeddings.new_zeros(T)
    steps = torch.linalg.vector_norm(embeddings[1:] - embeddings[:-1], dim=-1)  # (T-1,)
    steps = torch.cat([steps.new_zeros(1), steps])  # (T,) distance to the previous frame
    steps = torch.where(fs.offset == 0, 0.0, steps)  # restart at every segment start
    # per-segment cumsum in a padded (S, L_max) table keeps the seed's summation order exactly
    table = steps.new_zeros(S, int(fs.lengths.max())).index_put((fs.seg_id, fs.offset), steps)
    cum_table = table.cumsum(1)  # (S, L_max)
    cum = cum_table[fs.seg_id, fs.offset]  # (T,)
    if normalisers is None:
        final = cum_table[torch.arange(S, device=embeddings.device), fs.lengths - 1][fs.seg_id]  # (T,)
        positive = final > 0
        ramp = fs.offset.to(cum.dtype) / (fs.length - 1).clamp(min=1).to(cum.dtype)
        pred = torch.where(positive, cum / torch.where(positive, final, 1.0), ramp)
        pred = torch.where(fs.length == 1, 0.5, pred)
    else:
        missing = {lab for lab in fs.labels if not is_background(lab) and lab not in normalisers}
        if missing:
            raise KeyError(f"no normaliser for actions {sorted(missing)}")
        norm = torch.tensor(
            [float(normalisers[lab]) if not is_background(lab) else 1.0 for lab in fs.labels],
            dtype=cum.dtype,
            device=cum.device,
        )  # (S,)
        if bool((norm <= 0).any()):
            raise ValueError("action normalisers must be positive")
        pred = cum / norm[fs.seg_id]
    return torch.where(fs.action, pred, 0.0)  # (T,)


# ------------------------------------------------------------------ where in the action the error is
# The learnable head's failure (progress-head-fixes.md) is invisible in OGPE: a head stuck near 0.5
# scores ~0.25 everywhere. These statistics look at the action's start, middle and end separately.
# Inputs are the frames of N actions concatenated, `lengths` (N,) their lengths; every statistic is a
# per-action mean first, then a mean over actions, so that long actions do not dominate.
EARLY = (0.0, 0.1)  # relative position windows (inclusive) of progress_early / _mid / _end
MID = (0.45, 0.55)
END = (0.9, 1.0)


def relative_position(lengths: Tensor) -> Tensor:
    """Frame i of an action of L frames sits at i / (L - 1): the first frame at 0, the last at 1
    (a 1-frame action's only frame is its end, 1). (N,) -> (sum L,) float64."""
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    action = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)  # (F,)
    first = torch.cumsum(lengths, 0) - lengths  # (N,)
    i = torch.arange(int(lengths.sum())) - first[action]
    L = lengths[action]
    return torch.where(L > 1, i.double() / (L - 1).clamp(min=1).double(), 1.0)


def _per_action_means(values: Tensor, lengths: Tensor, group: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """Mean of `values` (F,) per (action, group) cell, group (F,) in [0, n_groups) or -1 (left out):
    -> means (N, n_groups) and counts (N, n_groups)."""
    N = lengths.numel()
    action = torch.repeat_interleave(torch.arange(N), lengths)
    keep = group >= 0
    cell = (action * n_groups + group)[keep]
    sums = torch.zeros(N * n_groups, dtype=torch.float64).index_add_(0, cell, values.double()[keep])
    counts = torch.bincount(cell, minlength=N * n_groups).double()
    return (sums / counts.clamp(min=1)).view(N, n_groups), counts.view(N, n_groups)


def _mean_over_actions(means: Tensor, counts: Tensor) -> Tensor:
    """(N, G) per-action means -> (G,) mean over the actions with frames in each group (NaN if none)."""
    has = counts > 0
    n = has.sum(0).double()
    total = torch.where(has, means, 0.0).sum(0)
    return torch.where(n > 0, total / n.clamp(min=1), float("nan"))


def window_mean(values: Tensor, lengths: Tensor, window: tuple[float, float]) -> float:
    """Mean over actions of the action's mean value at relative positions in `window` (inclusive);
    actions without a frame there (too short) are left out. NaN if no action has one."""
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    r = relative_position(lengths)
    group = torch.where((r >= window[0]) & (r <= window[1]), 0, -1)
    return float(_mean_over_actions(*_per_action_means(torch.as_tensor(values), lengths, group, 1))[0])


def calibration_bins(values: Tensor, lengths: Tensor, n_bins: int = 10) -> tuple[Tensor, Tensor]:
    """Per relative-position bin [b / n, (b + 1) / n) (the last one closed), the mean over actions of
    the action's mean value in the bin: -> (n_bins,) means (NaN for an empty bin) and (n_bins,) number
    of actions with frames in the bin."""
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    group = (relative_position(lengths) * n_bins).long().clamp(max=n_bins - 1)
    means, counts = _per_action_means(torch.as_tensor(values), lengths, group, n_bins)
    return _mean_over_actions(means, counts), (counts > 0).sum(0)


def monotonicity(values: Tensor, lengths: Tensor) -> float:
    """Mean over actions of 2+ frames of the fraction of consecutive steps with values[t+1] >= values[t]
    (1 for any non-decreasing curve; ~0.5 for noise). NaN if every action has one frame."""
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    values = torch.as_tensor(values)
    if values.numel() < 2:
        return float("nan")
    action = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)  # (F,)
    inside = action[1:] == action[:-1]  # (F - 1,) step t -> t+1 within one action: L - 1 per action
    up = (values[1:] >= values[:-1])[inside]
    means, counts = _per_action_means(up, lengths - 1, torch.zeros_like(action[1:][inside]), 1)
    return float(_mean_over_actions(means, counts)[0])
