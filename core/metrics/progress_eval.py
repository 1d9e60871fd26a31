"""Online progress evaluation (OGPE) of a trained progress-family model, with naive baselines.

Normalisers always come from TRAINING videos (the release accidentally used a test batch), and every
prediction at frame t uses frames <= t only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from core.data.video import Video, is_background
from core.metrics.progress import (
    action_cumulative_progress,
    cumulative_distance,
    ogpe,
    true_progress,
    true_progress_per_action,
)


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
    metrics: dict[str, float]
    curves: list[ActionCurve]


def _actions(times: dict) -> list[tuple[str, int, int]]:
    return [
        (str(s), int(a), int(b))
        for s, a, b in zip(times["step"], times["start_frame"], times["end_frame"], strict=True)
        if not is_background(s)
    ]


class ProgressEvaluator:
    def __init__(self, source: EmbeddingSource, train_videos: list[Video]) -> None:
        self.source = source
        self.train_videos = train_videos
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
            for label, a, b in _actions(v.times):
                per_action.setdefault(label, []).append(float(cum[b] - cum[a]))
        task_g = {k: float(np.mean(x)) for k, x in per_task.items()}
        action_g = {k: float(np.mean(x)) for k, x in per_action.items()}
        fallback = float(np.mean(list(action_g.values()))) if action_g else 1.0
        return task_g, action_g, fallback

    def _head_prediction(self, emb: torch.Tensor, times: dict) -> torch.Tensor:
        """Learnable head fed each action from its start, online; background frames stay 0."""
        head = self.source.model.progress_head
        pred = torch.zeros(emb.shape[0])
        for _, a, b in _actions(times):
            pred[a : b + 1] = head.predict_online(emb[a : b + 1]).cpu()
        return pred

    def _ramp(self, times: dict, T: int) -> torch.Tensor:
        pred = torch.zeros(T)
        for label, a, b in _actions(times):
            n = self.mean_length.get(label, self.default_length)
            pred[a : b + 1] = (torch.arange(1, b - a + 2) / n).clamp(max=1.0)
        return pred

    @torch.no_grad()
    def evaluate(self, videos: list[Video], *, curves: int = 0) -> EvalResult:
        """OGPE at video and action level plus baselines; `curves` example actions for plotting."""
        task_g, action_g, fallback = self._normalisers()
        embeddings = self.source.embed_videos(videos)
        head = getattr(self.source.model, "progress_head", None)
        if head is not None:
            head.eval()
        video_err, cum_err, head_err, const_err, ramp_err = [], [], [], [], []
        examples: list[ActionCurve] = []
        for v, e in zip(videos, embeddings, strict=True):
            T = e.shape[0]
            gt_video = true_progress(v.times, T)
            video_err.append(ogpe(cumulative_distance(e) / max(task_g.get(v.task, 1.0), 1e-12), gt_video))
            labels = {label for label, _, _ in _actions(v.times)}
            norms = {k: max(action_g.get(k, fallback), 1e-12) for k in labels}
            action_mask = true_progress_per_action(v.times, T) > 0
            if not action_mask.any():
                continue
            gt = true_progress_per_action(v.times, T)[action_mask]
            cum_pred = action_cumulative_progress(e, v.times, normalisers=norms)
            cum_err.append(ogpe(cum_pred[action_mask], gt))
            const_err.append(ogpe(torch.full_like(gt, 0.5), gt))
            ramp = self._ramp(v.times, T)
            ramp_err.append(ogpe(ramp[action_mask], gt))
            pred = cum_pred
            if head is not None:
                pred = self._head_prediction(e, v.times)
                head_err.append(ogpe(pred[action_mask], gt))
            full_gt = true_progress_per_action(v.times, T)
            for label, a, b in _actions(v.times):
                if len(examples) < curves:
                    sl = slice(a, b + 1)
                    examples.append(
                        ActionCurve(v.name, label, full_gt[sl].numpy(), pred[sl].numpy(), ramp[sl].numpy())
                    )
        mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
        metrics = {
            "ogpe": mean(video_err),
            "ogpe_action_cum": mean(cum_err),
            "ogpe_action": mean(head_err) if head is not None else mean(cum_err),
            "ogpe_action_baseline_const": mean(const_err),
            "ogpe_action_baseline_ramp": mean(ramp_err),
        }
        return EvalResult(metrics, examples)
