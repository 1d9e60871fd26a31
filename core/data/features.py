"""Loader for the released on-disk feature format, strict where the release was silently lenient.

Layout: `<root>/<features_dir>/<handle>.npy` holds a `(T, D)` array, one flat folder for all tasks, and
`<root>/<dataset_json>` is `{task: {handles, hdl_actions, hdl_start_times, hdl_end_times}}` with one
list entry per handle (parallel lists).

How the JSON segment times are read (the release never states it):
- Segment i of a video covers the half-open range `[start_i, end_i)`: segments are contiguous
  (`end_i == start_{i+1}`) and the first starts at 0, so in inclusive feature-frame indices
  `start_frame_i = start_i` and `end_frame_i = start_{i+1} - 1`, the last one `end_frame = end - 1`.
  Zero-length segments (`start_i == end_i`) are allowed in the JSON and dropped together with their label.
- With `annotation_fps`/`feature_fps` the boundaries (not the inclusive ends) are multiplied by
  `feature_fps / annotation_fps` and rounded half up, which keeps segments contiguous; a segment that
  becomes empty at the lower rate is dropped with its label. Without them the times must be integers.
- The annotated length (last boundary) may disagree with the feature count N by at most
  `max_overshoot_frames` feature frames in either direction (rounding, off-by-one extraction): segments
  starting at or beyond N are dropped WITH their `step` labels (the release forgot the labels) and the
  last kept segment is clamped or extended to end at N - 1. A larger disagreement raises `DataError`,
  never a silent truncation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.data.errors import DataError
from core.data.video import Video

SCHEMA_KEYS = ("handles", "hdl_actions", "hdl_start_times", "hdl_end_times")
# Rounding after an fps rescale and off-by-one feature extractors disagree by 1 frame; 2 leaves margin
# while any real misalignment (wrong fps, wrong file) is far larger and must fail loudly.
DEFAULT_MAX_OVERSHOOT_FRAMES = 2


def load_feature_dataset(
    root: str | Path,
    *,
    dataset_json: str = "dataset.json",
    features_dir: str = "features",
    annotation_fps: float | None = None,
    feature_fps: float | None = None,
    tasks: Sequence[str] | None = None,
    max_overshoot_frames: int = DEFAULT_MAX_OVERSHOOT_FRAMES,
) -> list[Video]:
    """Load every video of the selected tasks (JSON order, or the order of `tasks`) as `Video` records."""
    if max_overshoot_frames < 0:
        raise ValueError(f"max_overshoot_frames must be >= 0, got {max_overshoot_frames}")
    root = Path(root)
    json_path = root / dataset_json
    scale = _fps_scale(annotation_fps, feature_fps)
    data = _read_json(json_path)
    if not isinstance(data, dict):
        raise DataError(
            f"{json_path}: expected a JSON object mapping task -> entry, got {type(data).__name__}"
        )
    selected = list(data) if tasks is None else list(dict.fromkeys(tasks))
    missing = [task for task in selected if task not in data]
    if missing:
        raise DataError(f"{json_path}: tasks {missing} not in the dataset (it has {sorted(data)})")

    videos: list[Video] = []
    owner: dict[str, str] = {}  # handle -> task, to reject a handle listed twice anywhere
    dim: tuple[int, str] | None = None  # (D, handle it came from)
    for task in selected:
        for handle, actions, starts, ends in _task_entries(json_path, task, data[task]):
            where = f"{json_path}: task {task!r}, handle {handle!r}"
            if handle in owner:
                raise DataError(f"{where}: handle listed twice (first in task {owner[handle]!r})")
            owner[handle] = task
            features = _load_features(root / features_dir / f"{handle}.npy", where)  # (T, D)
            if dim is None:
                dim = (features.shape[1], handle)
            elif features.shape[1] != dim[0]:
                raise DataError(
                    f"{where}: features have D={features.shape[1]} but handle {dim[1]!r} has D={dim[0]}"
                )
            times = _segments_to_times(
                where, handle, actions, starts, ends, scale, features.shape[0], max_overshoot_frames
            )
            videos.append(Video(name=handle, task=task, features=features, times=times))
    return videos


def _fps_scale(annotation_fps: float | None, feature_fps: float | None) -> float | None:
    if annotation_fps is None and feature_fps is None:
        return None
    if annotation_fps is None or feature_fps is None:
        raise ValueError("give both annotation_fps and feature_fps, or neither")
    if not (annotation_fps > 0 and feature_fps > 0):
        raise ValueError(f"fps must be > 0, got annotation_fps={annotation_fps}, feature_fps={feature_fps}")
    return feature_fps / annotation_fps


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"{path}: dataset JSON not found") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON ({err})") from None


def _task_entries(json_path: Path, task: str, entry: Any) -> list[tuple[str, list, list, list]]:
    """Validate one task's parallel lists and return (handle, actions, starts, ends) per video."""
    where = f"{json_path}: task {task!r}"
    if not isinstance(entry, dict):
        raise DataError(
            f"{where}: expected an object with keys {list(SCHEMA_KEYS)}, got {type(entry).__name__}"
        )
    absent = [key for key in SCHEMA_KEYS if key not in entry]
    if absent:
        raise DataError(f"{where}: missing keys {absent}")
    for key in SCHEMA_KEYS:
        if not isinstance(entry[key], list):
            raise DataError(f"{where}: {key!r} must be a list, got {type(entry[key]).__name__}")
    handles = entry["handles"]
    for key in SCHEMA_KEYS[1:]:
        if len(entry[key]) < len(handles):
            raise DataError(
                f"{where}, handle {handles[len(entry[key])]!r}: no {key!r} entry "
                f"({len(entry[key])} entries for {len(handles)} handles)"
            )
        if len(entry[key]) > len(handles):
            raise DataError(f"{where}: {key!r} has {len(entry[key])} entries for {len(handles)} handles")

    rows = []
    for i, handle in enumerate(handles):
        if not isinstance(handle, str) or handle in ("", ".", "..") or Path(handle).name != handle:
            raise DataError(f"{where}: handle #{i} {handle!r} is not a plain file name")
        hwhere = f"{where}, handle {handle!r}"
        actions, starts, ends = (entry[key][i] for key in SCHEMA_KEYS[1:])
        for key, value in zip(SCHEMA_KEYS[1:], (actions, starts, ends), strict=True):
            if not isinstance(value, list):
                raise DataError(f"{hwhere}: {key!r} entry must be a list, got {type(value).__name__}")
        if not actions:
            raise DataError(f"{hwhere}: no segments")
        if not len(actions) == len(starts) == len(ends):
            raise DataError(
                f"{hwhere}: list lengths differ (hdl_actions {len(actions)}, "
                f"hdl_start_times {len(starts)}, hdl_end_times {len(ends)})"
            )
        for s, label in enumerate(actions):
            if isinstance(label, bool) or not isinstance(label, str | int):
                raise DataError(f"{hwhere}, segment {s}: action label {label!r} is not a string")
        for key, values in (("hdl_start_times", starts), ("hdl_end_times", ends)):
            for s, value in enumerate(values):
                if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                    raise DataError(f"{hwhere}, segment {s}: {key} value {value!r} is not a finite number")
        rows.append((handle, [str(label) for label in actions], starts, ends))
    return rows


def _load_features(path: Path, where: str) -> np.ndarray:
    """Read one `.npy` as float32 (T, D), rejecting anything a model would silently choke on."""
    if not path.is_file():
        raise DataError(f"{where}: missing feature file {path}")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{where}: unreadable feature file {path} ({err})") from None
    if array.ndim != 2:
        raise DataError(f"{where}: feature file {path} has shape {array.shape}, expected (T, D)")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"{where}: feature file {path} is empty, shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise DataError(f"{where}: feature file {path} has non-real dtype {array.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is reported just below
        features = np.ascontiguousarray(array, dtype=np.float32)  # (T, D)
    bad_rows = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if bad_rows.size:
        raise DataError(
            f"{where}: feature file {path} has NaN/inf values (as float32) in {bad_rows.size} frames, "
            f"first at frame {bad_rows[0]}"
        )
    return features


def _segments_to_times(
    where: str,
    handle: str,
    actions: list[str],
    starts: list[float],
    ends: list[float],
    scale: float | None,
    n_frames: int,
    tolerance: int,
) -> dict[str, Any]:
    """JSON half-open segments -> inclusive feature-frame `times` covering exactly 0..n_frames-1."""
    start = np.asarray(starts, dtype=np.float64)  # (S,)
    end = np.asarray(ends, dtype=np.float64)  # (S,)
    if start[0] != 0:
        raise DataError(f"{where}, segment 0: starts at {starts[0]}, expected 0")
    backwards = np.flatnonzero(end < start)
    if backwards.size:
        s = backwards[0]
        raise DataError(f"{where}, segment {s}: end {ends[s]} < start {starts[s]}")
    gaps = np.flatnonzero(end[:-1] != start[1:])
    if gaps.size:
        s = gaps[0]
        raise DataError(
            f"{where}, segment {s}: not contiguous "
            f"(ends at {ends[s]} but segment {s + 1} starts at {starts[s + 1]})"
        )
    bounds = np.append(start, end[-1])  # (S+1,) segment s = [bounds[s], bounds[s+1])
    if scale is None:
        fractional = np.flatnonzero(bounds != np.round(bounds))
        if fractional.size:
            s = min(fractional[0], len(actions) - 1)
            raise DataError(
                f"{where}, segment {s}: non-integer frame index {bounds[fractional[0]]}; "
                "pass annotation_fps and feature_fps to rescale"
            )
    else:
        bounds = bounds * scale
    bounds = np.floor(bounds + 0.5).astype(np.int64)  # round half up, identical for every boundary

    mismatch = int(bounds[-1]) - n_frames
    if abs(mismatch) > tolerance:
        beyond = np.flatnonzero(bounds[:-1] >= n_frames)
        detail = f"; segment {beyond[0]} starts beyond the video" if beyond.size else ""
        raise DataError(
            f"{where}: annotation ends at feature frame {bounds[-1]} (exclusive) but the feature file has "
            f"{n_frames} frames, off by {mismatch:+d} > max_overshoot_frames={tolerance}{detail}"
        )
    keep = (bounds[1:] > bounds[:-1]) & (bounds[:-1] < n_frames)  # (S,) non-empty and inside the video
    start_frame = bounds[:-1][keep]
    end_frame = bounds[1:][keep] - 1
    if start_frame.size == 0:
        raise DataError(f"{where}: no non-empty segment after rescaling")
    end_frame[-1] = n_frames - 1  # clamp an overshoot / extend an undershoot within tolerance
    return {
        "step": [label for label, k in zip(actions, keep, strict=True) if k],
        "start_frame": start_frame.tolist(),
        "end_frame": end_frame.tolist(),
        "name": handle,
    }
