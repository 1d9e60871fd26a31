"""Synthetic procedural videos with known step structure, so the progress family can be trained and tested
without the real datasets, and the real loader can be exercised on generated files.

Each task is a fixed ordered list of steps; each step is a smooth curve in feature space from a
step-specific start point to an end point, so position along the step (= action-level progress) is
readable from the content. Videos perform the steps in order at their own speed, with background
('SIL') gaps between them and Gaussian noise on every frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.atomic import atomic_write_json
from core.data.splits import Splits, make_splits, save_splits
from core.data.video import Video

# Independent random streams per seed: task structure, per-video sampling, background mean. Keeping them
# separate means a task's steps and a given video do not change when other counts change.
_TASK_STREAM, _VIDEO_STREAM, _BACKGROUND_STREAM = 0, 1, 2
_MIN_STEP_FRAMES = 2  # a step needs a first and a last frame that differ


@dataclass(frozen=True)
class _Task:
    name: str
    steps: list[str]
    nominal_len: np.ndarray  # (S,) typical duration of each step in frames
    start: np.ndarray  # (S, D) trajectory start points
    delta: np.ndarray  # (S, D) end - start
    bend: np.ndarray  # (S, D) orthogonal to delta: curvature that keeps progress along delta monotone


def make_procedure_dataset(
    *,
    seed: int = 0,
    n_tasks: int = 3,
    videos_per_task: int = 24,
    steps_per_task: tuple[int, int] = (3, 6),
    d_in: int = 64,
    step_len: tuple[int, int] = (6, 40),
    background_len: tuple[int, int] = (0, 12),
    noise: float = 0.3,
    speed_jitter: float = 0.3,
    step_jitter: float = 0.15,
    bend: float = 0.5,
) -> list[Video]:
    """Generate `n_tasks * videos_per_task` videos (task `t{i}`, video `t{i}_v{j:03d}`, step `t{i}_s{k}`).

    Ranges are inclusive. Step durations: each task's steps get nominal lengths stratified over the
    log of `step_len` (every task has a short and a long step), scaled per video by a speed factor
    `exp(U(-speed_jitter, speed_jitter))` and per step by `exp(U(-step_jitter, step_jitter))`.
    Background gaps before, between and after steps have lengths in `background_len` (0 = omitted).
    Trajectory points are N(0, 1) per dimension; `noise` is the per-dimension frame noise std; `bend`
    scales the curvature relative to the step's extent.
    """
    _check_range("steps_per_task", steps_per_task, 1)
    _check_range("step_len", step_len, 1)
    _check_range("background_len", background_len, 0)
    if n_tasks < 1 or videos_per_task < 1 or d_in < 1:
        raise ValueError("n_tasks, videos_per_task and d_in must be >= 1")
    if min(noise, speed_jitter, step_jitter, bend) < 0:
        raise ValueError("noise, speed_jitter, step_jitter and bend must be >= 0")

    background_mean = np.random.default_rng([seed, _BACKGROUND_STREAM]).normal(size=d_in)  # (D,)
    videos = []
    for t in range(n_tasks):
        task = _make_task(
            np.random.default_rng([seed, _TASK_STREAM, t]), t, steps_per_task, step_len, d_in, bend
        )
        for v in range(videos_per_task):
            rng = np.random.default_rng([seed, _VIDEO_STREAM, t, v])
            videos.append(
                _make_video(
                    rng,
                    task,
                    f"{task.name}_v{v:03d}",
                    background_mean,
                    background_len,
                    noise,
                    speed_jitter,
                    step_jitter,
                )
            )
    return videos


def _check_range(name: str, value: tuple[int, int], low: int) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1]:
        raise ValueError(f"{name} must be (lo, hi) with {low} <= lo <= hi, got {value}")


def _make_task(
    rng: np.random.Generator,
    index: int,
    steps_per_task: tuple[int, int],
    step_len: tuple[int, int],
    d: int,
    bend: float,
) -> _Task:
    n_steps = int(rng.integers(steps_per_task[0], steps_per_task[1] + 1))
    # Stratified log-uniform nominal lengths, shuffled: one per stratum guarantees short and long steps.
    log_lo, log_hi = np.log(step_len[0]), np.log(step_len[1])
    strata = (np.arange(n_steps) + rng.uniform(size=n_steps)) / n_steps  # (S,) in [0, 1)
    nominal_len = np.exp(log_lo + (log_hi - log_lo) * rng.permutation(strata))
    start = rng.normal(size=(n_steps, d))
    delta = rng.normal(size=(n_steps, d)) - start
    raw_bend = rng.normal(size=(n_steps, d))
    unit = delta / np.linalg.norm(delta, axis=1, keepdims=True)
    orthogonal = raw_bend - (raw_bend * unit).sum(axis=1, keepdims=True) * unit
    scale = (
        bend
        * np.linalg.norm(delta, axis=1, keepdims=True)
        / np.linalg.norm(orthogonal, axis=1, keepdims=True)
    )
    return _Task(
        name=f"t{index}",
        steps=[f"t{index}_s{k}" for k in range(n_steps)],
        nominal_len=nominal_len,
        start=start,
        delta=delta,
        bend=orthogonal * scale,
    )


def _make_video(
    rng: np.random.Generator,
    task: _Task,
    name: str,
    background_mean: np.ndarray,
    background_len: tuple[int, int],
    noise: float,
    speed_jitter: float,
    step_jitter: float,
) -> Video:
    n_steps = len(task.steps)
    speed = np.exp(rng.uniform(-speed_jitter, speed_jitter))
    jitter = np.exp(rng.uniform(-step_jitter, step_jitter, size=n_steps))
    lengths = np.maximum(_MIN_STEP_FRAMES, np.floor(task.nominal_len * speed * jitter + 0.5)).astype(int)
    gaps = rng.integers(background_len[0], background_len[1] + 1, size=n_steps + 1)

    labels: list[str] = []
    chunks: list[np.ndarray] = []
    for k in range(n_steps + 1):
        if gaps[k] > 0:
            labels.append("SIL")
            chunks.append(np.broadcast_to(background_mean, (gaps[k], background_mean.size)))
        if k < n_steps:
            s = (np.arange(lengths[k]) + 1.0) / lengths[k]  # (L,) position along the step, ends at 1
            trajectory = (
                task.start[k] + np.outer(s, task.delta[k]) + np.outer(np.sin(np.pi * s), task.bend[k])
            )
            labels.append(task.steps[k])
            chunks.append(trajectory)
    clean = np.concatenate(chunks)  # (T, D)
    features = (clean + rng.normal(scale=noise, size=clean.shape)).astype(np.float32)
    ends = np.cumsum([len(chunk) for chunk in chunks])
    times = {
        "step": labels,
        "start_frame": [0, *ends[:-1].tolist()],
        "end_frame": (ends - 1).tolist(),
        "name": name,
    }
    return Video(name=name, task=task.name, features=features, times=times)


def write_feature_dataset(
    videos: list[Video],
    root: str | Path,
    *,
    splits: Splits | None = None,
    split_seed: int = 42,
    dataset_json: str = "dataset.json",
    features_dir: str = "features",
) -> Path:
    """Write videos in the released on-disk layout plus `data_splits.json`; returns `root`.

    JSON segments are half-open (`end = end_frame + 1`), the reading `load_feature_dataset` inverts.
    Without `splits`, `make_splits(videos, seed=split_seed)` is written.
    """
    root = Path(root)
    names = [video.name for video in videos]
    if len(set(names)) != len(names):
        raise ValueError("video names must be unique: features live in one flat folder")
    (root / features_dir).mkdir(parents=True, exist_ok=True)
    dataset: dict[str, dict[str, list]] = {}
    for video in videos:
        np.save(root / features_dir / f"{video.name}.npy", video.features.astype(np.float32, copy=False))
        entry = dataset.setdefault(
            video.task, {"handles": [], "hdl_actions": [], "hdl_start_times": [], "hdl_end_times": []}
        )
        entry["handles"].append(video.name)
        entry["hdl_actions"].append(list(video.times["step"]))
        entry["hdl_start_times"].append([int(s) for s in video.times["start_frame"]])
        entry["hdl_end_times"].append([int(e) + 1 for e in video.times["end_frame"]])
    atomic_write_json(root / dataset_json, dataset)
    save_splits(make_splits(videos, seed=split_seed) if splits is None else splits, root / "data_splits.json")
    return root
