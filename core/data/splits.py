"""Fixed train/val/test splits by handle, stored next to the data so every stage sees the same test set.

Re-deriving splits from JSON order gave the release inconsistent test sets between training and
evaluation; here a split is a file (`data_splits.json`, `{task: {"train": [...], "val": [...],
"test": [...]}}`) written once and validated against the loaded videos on every read.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from core.atomic import atomic_write_json
from core.data.errors import DataError
from core.data.video import Video

SPLIT_NAMES = ("train", "val", "test")
# split name -> task -> handles
Splits = dict[str, dict[str, list[str]]]


class Handle(NamedTuple):
    """What the split functions read from a video: its name within its task (stand-in for records
    whose split unit is not the video itself, e.g. a slots recording)."""

    name: str
    task: str


def make_splits(
    videos: Sequence[Video], *, fractions: tuple[float, float, float] = (0.75, 0.10, 0.15), seed: int = 42
) -> Splits:
    """Split each task's handles by `fractions` (train, val, test), independent of input order.

    Each task is shuffled by its own generator (seeded by `seed` and the task name), so adding a task
    never changes the splits of the others. A split with a positive fraction gets at least one video
    when the task has >= 3; with fewer, train is filled first, then test, then val.
    """
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-9):
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    by_task: dict[str, list[str]] = {}
    for video in videos:
        by_task.setdefault(video.task, []).append(video.name)
    splits: Splits = {name: {} for name in SPLIT_NAMES}
    for task in sorted(by_task):
        handles = sorted(by_task[task])
        if len(set(handles)) != len(handles):
            raise ValueError(f"task {task!r}: duplicate video names")
        rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
        shuffled = [handles[i] for i in rng.permutation(len(handles))]
        n_train, n_val, _ = _split_counts(len(handles), fractions)
        parts = (shuffled[:n_train], shuffled[n_train : n_train + n_val], shuffled[n_train + n_val :])
        for name, part in zip(SPLIT_NAMES, parts, strict=True):
            splits[name][task] = sorted(part)
    return splits


def _split_counts(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """(train, val, test) sizes: rounded half up, >= 1 for positive fractions, train never empty."""
    val, test = (max(1, math.floor(n * f + 0.5)) if f > 0 else 0 for f in fractions[1:])
    while n - val - test < 1 and val + test > 0:
        if val >= test:
            val -= 1
        else:
            test -= 1
    return n - val - test, val, test


def load_splits(path: str | Path, videos: Sequence[Video]) -> Splits:
    """Read `data_splits.json` and check it against the loaded videos.

    Tasks absent from `videos` are skipped (a run may load a subset of tasks); an unknown handle, a
    handle in two splits or a malformed entry raises `DataError` naming file, task, split and handle.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: splits file not found") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object mapping task -> splits, got {type(raw).__name__}")
    known: dict[str, set[str]] = {}
    for video in videos:
        known.setdefault(video.task, set()).add(video.name)
    if set(raw) == set(SPLIT_NAMES) and all(isinstance(v, list) for v in raw.values()):
        # split -> handles without tasks: what single-task families (slots) wrote before this format;
        # their run dirs still resume
        if len(known) != 1:
            raise DataError(f"{path}: splits without tasks, but the videos have tasks {sorted(known)}")
        raw = {next(iter(known)): raw}

    splits: Splits = {name: {} for name in SPLIT_NAMES}
    for task, entry in raw.items():
        if task not in known:
            continue
        where = f"{path}: task {task!r}"
        if not isinstance(entry, dict) or set(entry) != set(SPLIT_NAMES):
            keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise DataError(f"{where}: expected an object with keys {list(SPLIT_NAMES)}, got {keys}")
        seen: dict[str, str] = {}  # handle -> split it was first listed in
        for split in SPLIT_NAMES:
            handles = entry[split]
            if not isinstance(handles, list):
                raise DataError(f"{where}, split {split!r}: expected a list, got {type(handles).__name__}")
            for handle in handles:
                if not isinstance(handle, str) or handle not in known[task]:
                    raise DataError(f"{where}, split {split!r}: unknown handle {handle!r}")
                if handle in seen:
                    raise DataError(
                        f"{where}, split {split!r}: handle {handle!r} also in split {seen[handle]!r}"
                    )
                seen[handle] = split
            splits[split][task] = list(handles)
    return splits


def save_splits(splits: Splits, path: str | Path) -> None:
    """Write `splits` in the `data_splits.json` format atomically, so a crash never leaves half a file."""
    path = Path(path)
    tasks = list(dict.fromkeys(task for name in SPLIT_NAMES for task in splits.get(name, {})))
    payload = {
        task: {name: list(splits.get(name, {}).get(task, [])) for name in SPLIT_NAMES} for task in tasks
    }
    atomic_write_json(path, payload)


def resolve_splits(
    videos: Sequence[Video],
    run_dir: str | Path,
    *,
    fractions: Sequence[float],
    seed: int,
    dataset_file: str | Path | None = None,
    derive: Callable[[], Splits] | None = None,
) -> Splits:
    """A run's fixed splits, the one rule every family follows: the run dir's own `splits.json` (resume,
    eval), else the dataset's splits file when given and present, else derived by `derive()` (default:
    `make_splits(videos, fractions, seed)`). Nothing is written here: a family's `save` stores them in the
    run dir once the run is known to be valid."""
    saved = Path(run_dir) / "splits.json"
    if saved.exists():
        return load_splits(saved, videos)
    if dataset_file is not None and Path(dataset_file).exists():
        return load_splits(dataset_file, videos)
    if derive is not None:
        return derive()
    return make_splits(videos, fractions=(*fractions,), seed=seed)


def select(videos: Sequence[Video], splits: Splits, split: str) -> list[Video]:
    """The videos of one split, in the split's task and handle order."""
    if split not in splits:
        raise KeyError(f"unknown split {split!r}; have {sorted(splits)}")
    index = {(video.task, video.name): video for video in videos}
    missing = [
        (task, h) for task, handles in splits[split].items() for h in handles if (task, h) not in index
    ]
    if missing:
        raise DataError(
            f"split {split!r}: {len(missing)} (task, handle) pairs not among the videos, e.g. {missing[0]}"
        )
    return [index[(task, h)] for task, handles in splits[split].items() for h in handles]
