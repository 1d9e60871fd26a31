"""Online progress evaluation (OGPE) of a trained progress-family model, with naive baselines.

Normalisers always come from TRAINING videos (the release accidentally used a test batch), and every
prediction at frame t uses frames <= t only. Besides OGPE the evaluator reports where in an action
the error sits (start / middle / end, monotonicity, a calibration table over relative position):
the seeds' learnable head looked fine by its loss while starting every action at ~0.6.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from core.data.video import Video, is_background
from core.metrics.progress import (
    EARLY,
    END,
    MID,
    VIDEO_PROGRESS_GT,
    action_cumulative_progress,
    calibration_bins,
    cumulative_distance,
    monotonicity,
    ogpe,
    true_progress,
    window_mean,
)

CALIBRATION_BINS = 10
# every key of EvalResult.metrics, in a stable order (a family's logged_metrics lists them)
METRIC_NAMES = (
    "ogpe",
    "ogpe_action",
    "ogpe_action_cum",
    "ogpe_action_baseline_const",
    "ogpe_action_baseline_ramp",
    *(
        f"progress_{where}{series}"
        for where in ("early", "mid", "end")
        for series in ("", "_true", "_baseline_ramp")
    ),
    "monotonicity",
)
_CONST = 0.5  # the constant baseline; its early/mid/end are 0.5 by definition, so only the table shows it


class EmbeddingSource(Protocol):
    model: torch.nn.Module

    def embed_videos(self, videos: list[Video]) -> list[torch.Tensor]: ...


@dataclass
class ActionCurve:
    video: str
    action: str
    truth: np.ndarray
    predicted: np.ndarray
    ramp: np.ndarray


@dataclass
class EvalResult:
    """`metrics`: scalar columns (METRIC_NAMES). `calibration`: per relative-position bin the mean over
    actions of predicted, true and baseline progress (JSON-ready lists). `curves`: example actions."""

    metrics: dict[str, float]
    curves: list[ActionCurve]
    calibration: dict[str, Any] = field(default_factory=dict)


def _actions(times: dict, T: int | None = None) -> list[tuple[str, int, int]]:
    """(label, first, last) of the non-background segments, clipped to a video of T frames if given."""
    out = []
    for s, a, b in zip(times["step"], times["start_frame"], times["end_frame"], strict=True):
        a, b = int(a), int(b)
        if T is not None:
            if a > T - 1 or b < max(a, 0):
                continue
            a, b = max(a, 0), min(b, T - 1)
        if not is_background(s):
            out.append((str(s), a, b))
    return out


class ProgressEvaluator:
    """`video_gt` names the video-level ground truth of `ogpe` (core.metrics.progress.true_progress's
    `definition`; "release" is the paper's)."""

    def __init__(self, source: EmbeddingSource, train_videos: list[Video], video_gt: str = "release") -> None:
        if video_gt not in VIDEO_PROGRESS_GT:
            raise ValueError(f"video_gt must be one of {VIDEO_PROGRESS_GT}, got {video_gt!r}")
        self.source = source
        self.train_videos = train_videos
        self.video_gt = video_gt
        lengths: dict[str, list[int]] = {}
        for v in train_videos:
            for label, a, b in _actions(v.times):
                lengths.setdefault(label, []).append(b - a + 1)
        # the ramp baseline's per-action duration, fixed by the training annotation
        self.mean_length = {k: float(np.mean(x)) for k, x in lengths.items()}
        self.default_length = float(np.mean([x for xs in lengths.values() for x in xs])) if lengths else 1.0

    def _normalisers(self) -> tuple[dict[str, float], dict[str, float], float]:
        """Per-task mean final cumulative distance (video level) and per-action (action level)."""
        per_task: dict[str, list[float]] = {}
        per_action: dict[str, list[float]] = {}
        for v, e in zip(self.train_videos, self.source.embed_videos(self.train_videos), strict=True):
            cum = cumulative_distance(e)
            per_task.setdefault(v.task, []).append(float(cum[-1]))
            for label, a, b in _actions(v.times, e.shape[0]):
                per_action.setdefault(label, []).append(float(cum[b] - cum[a]))
        task_g = {k: float(np.mean(x)) for k, x in per_task.items()}
        action_g = {k: float(np.mean(x)) for k, x in per_action.items()}
        fallback = float(np.mean(list(action_g.values()))) if action_g else 1.0
        return task_g, action_g, fallback

    @torch.no_grad()
    def evaluate(self, videos: list[Video], *, curves: int = 0) -> EvalResult:
        """OGPE at video and action level, where-in-the-action statistics and calibration, each with the
        constant-0.5 and ramp baselines; `curves` example actions for plotting.

        The prediction is the learnable head's when the model has one (each action fed from its start,
        all actions of all videos in one batched call), else the action-level cumulative-L2 progress."""
        task_g, action_g, fallback = self._normalisers()
        embeddings = self.source.embed_videos(videos)
        head = getattr(self.source.model, "progress_head", None)
        if head is not None:
            head.eval()
        video_err: list[float] = []
        spans: list[tuple[int, str, int, int]] = []  # (video, label, first, last) of every action
        cum_parts: list[torch.Tensor] = []  # cumulative-L2 prediction on each action's frames
        for i, (v, e) in enumerate(zip(videos, embeddings, strict=True)):
            T = e.shape[0]
            g = max(task_g.get(v.task, 1.0), 1e-12)
            video_err.append(
                ogpe(cumulative_distance(e) / g, true_progress(v.times, T, definition=self.video_gt))
            )
            actions = _actions(v.times, T)
            if not actions:
                continue
            norms = {label: max(action_g.get(label, fallback), 1e-12) for label, _, _ in actions}
            cum = action_cumulative_progress(e, v.times, normalisers=norms)  # (T,)
            cum_parts += [cum[a : b + 1] for _, a, b in actions]
            spans += [(i, label, a, b) for label, a, b in actions]
        if not spans:  # no action anywhere: only the video-level OGPE exists
            nan = dict.fromkeys(METRIC_NAMES, float("nan"))
            return EvalResult({**nan, "ogpe": float(np.mean(video_err)) if video_err else float("nan")}, [])
        lengths = torch.tensor([b - a + 1 for _, _, a, b in spans])  # (N,)
        action = torch.repeat_interleave(torch.arange(len(spans)), lengths)  # (F,) action of each frame
        offset = torch.arange(int(lengths.sum())) - (torch.cumsum(lengths, 0) - lengths)[action]
        truth = (offset + 1).double() / lengths[action].double()  # (F,) action-level ground truth
        expected = torch.tensor(
            [self.mean_length.get(label, self.default_length) for _, label, _, _ in spans],
            dtype=torch.float64,
        )  # (N,) mean training duration of each action's label
        ramp = ((offset + 1).double() / expected[action]).clamp(max=1.0)
        cum_pred = torch.cat(cum_parts).double()
        pred = cum_pred
        if head is not None:
            pred = head.predict_online_actions([embeddings[i][a : b + 1] for i, _, a, b in spans])
            pred = pred.cpu().double()  # (F,)
        video = torch.tensor([i for i, _, _, _ in spans])[action]  # (F,)
        frames_per_video = torch.unique_consecutive(video, return_counts=True)[1].tolist()

        def per_video(x: torch.Tensor) -> list[torch.Tensor]:
            return list(torch.split(x, frames_per_video))

        truth_v = per_video(truth)
        metrics = {
            "ogpe": float(np.mean(video_err)),
            "ogpe_action_cum": ogpe(per_video(cum_pred), truth_v),
            "ogpe_action": ogpe(per_video(pred), truth_v),
            "ogpe_action_baseline_const": ogpe(per_video(torch.full_like(truth, _CONST)), truth_v),
            "ogpe_action_baseline_ramp": ogpe(per_video(ramp), truth_v),
            "monotonicity": monotonicity(pred, lengths),
        }
        series = {"": pred, "_true": truth, "_baseline_ramp": ramp}
        for where, window in (("early", EARLY), ("mid", MID), ("end", END)):
            for suffix, values in series.items():
                metrics[f"progress_{where}{suffix}"] = window_mean(values, lengths, window)
        calibration = self._calibration({"predicted": pred, "true": truth, "ramp": ramp}, lengths)
        examples = []
        starts = torch.cumsum(lengths, 0) - lengths
        for n, (i, label, _, _) in enumerate(spans[:curves]):
            sl = slice(int(starts[n]), int(starts[n] + lengths[n]))
            examples.append(
                ActionCurve(videos[i].name, label, truth[sl].numpy(), pred[sl].numpy(), ramp[sl].numpy())
            )
        return EvalResult({k: metrics[k] for k in METRIC_NAMES}, examples, calibration)

    @staticmethod
    def _calibration(series: dict[str, torch.Tensor], lengths: torch.Tensor) -> dict[str, Any]:
        """Binned over relative position (`calibration_bins`); NaN bins (no action long enough) -> None."""
        edges = np.linspace(0.0, 1.0, CALIBRATION_BINS + 1)
        out: dict[str, Any] = {"bin_low": edges[:-1].tolist(), "bin_high": edges[1:].tolist()}
        for name, values in series.items():
            means, n_actions = calibration_bins(values, lengths, CALIBRATION_BINS)
            out[name] = [None if np.isnan(m) else m for m in means.tolist()]
        out["const"] = [_CONST] * CALIBRATION_BINS
        out["n_actions"] = n_actions.tolist()
        out["relative_position"] = "frame i of an L-frame action at i / (L - 1); mean over actions per bin"
        return out
