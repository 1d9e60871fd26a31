"""Data layer: synthetic generator, on-disk loader (incl. malformed inputs), fixed splits."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from core.data.errors import DataError
from core.data.features import load_feature_dataset
from core.data.splits import SPLIT_NAMES, load_splits, make_splits, save_splits, select
from core.data.synthetic import make_procedure_dataset, write_feature_dataset
from core.data.video import Video, is_background

SMALL = {"n_tasks": 2, "videos_per_task": 6, "d_in": 16}


def _segments(video: Video) -> list[tuple[str, int, int]]:
    t = video.times
    return list(zip(t["step"], t["start_frame"], t["end_frame"], strict=True))


# ---------------------------------------------------------------- synthetic generator


@pytest.fixture(scope="module")
def dataset() -> list[Video]:
    return make_procedure_dataset(seed=0)


def test_synthetic_is_deterministic_per_seed() -> None:
    a, b, c = (make_procedure_dataset(seed=s, **SMALL) for s in (3, 3, 4))
    assert [v.name for v in a] == [v.name for v in b]
    for va, vb in zip(a, b, strict=True):
        np.testing.assert_array_equal(va.features, vb.features)
        assert va.times == vb.times
    assert any(
        va.times != vc.times
        or va.features.shape != vc.features.shape
        or not np.array_equal(va.features, vc.features)
        for va, vc in zip(a, c, strict=True)
    )
    assert not np.array_equal(a[0].features[:5], c[0].features[:5])


def test_synthetic_video_is_stable_when_counts_change() -> None:
    # Separate random streams: video t0_v001 does not depend on how many videos or tasks follow it.
    few = make_procedure_dataset(seed=1, n_tasks=1, videos_per_task=2, d_in=8)
    many = make_procedure_dataset(seed=1, n_tasks=2, videos_per_task=5, d_in=8)
    np.testing.assert_array_equal(few[1].features, many[1].features)
    assert few[1].times == many[1].times


def test_synthetic_times_are_contiguous_inclusive_and_cover(dataset: list[Video]) -> None:
    assert len(dataset) == 3 * 24 and len({v.name for v in dataset}) == len(dataset)
    for video in dataset:
        t = video.times
        assert t["name"] == video.name
        assert len(t["step"]) == len(t["start_frame"]) == len(t["end_frame"])
        start, end = np.array(t["start_frame"]), np.array(t["end_frame"])
        assert start[0] == 0 and end[-1] == video.num_frames - 1
        assert (end >= start).all() and (start[1:] == end[:-1] + 1).all()
        assert video.features.dtype == np.float32 and video.features.shape[1] == 64
        assert np.isfinite(video.features).all()
        steps = [s for s in t["step"] if not is_background(s)]
        assert steps == sorted(steps, key=lambda s: int(s.split("_s")[1]))  # steps in task order
        assert all(s.startswith(video.task + "_s") for s in steps)


def test_synthetic_has_short_and_long_steps_and_background(dataset: list[Video]) -> None:
    lengths = np.array(
        [e - s + 1 for video in dataset for label, s, e in _segments(video) if not is_background(label)]
    )
    assert lengths.min() <= 8 and lengths.max() >= 35
    assert any(label == "SIL" for video in dataset for label in video.times["step"])
    # every task individually has a short and a long step on average (stratified nominal durations)
    for task in {v.task for v in dataset}:
        per_step: dict[str, list[int]] = {}
        for v in dataset:
            for label, s, e in _segments(v):
                if v.task == task and not is_background(label):
                    per_step.setdefault(label, []).append(e - s + 1)
        means = [np.mean(lengths) for lengths in per_step.values()]
        assert min(means) < 13 and max(means) > 19, means


def test_synthetic_content_varies_within_a_step(dataset: list[Video]) -> None:
    d, noise = 64, 0.3
    first_last = [
        np.linalg.norm(v.features[e] - v.features[s])
        for v in dataset
        for label, s, e in _segments(v)
        if not is_background(label)
    ]
    # Two noisy frames at the SAME point differ by about noise * sqrt(2 D) = 3.4.
    assert np.mean(first_last) > 2 * noise * np.sqrt(2 * d)


def test_synthetic_steps_progress_monotonically_without_noise() -> None:
    for video in make_procedure_dataset(seed=2, noise=0.0, **SMALL):
        for label, s, e in _segments(video):
            x = video.features[s : e + 1].astype(np.float64)  # (L, D)
            if is_background(label):
                np.testing.assert_allclose(x, np.broadcast_to(x[0], x.shape))
                continue
            direction = x[-1] - x[0]
            assert (np.diff((x - x[0]) @ direction) > 0).all(), (video.name, label)


def test_synthetic_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="step_len"):
        make_procedure_dataset(step_len=(10, 5))
    with pytest.raises(ValueError, match="noise"):
        make_procedure_dataset(noise=-1.0)


# ---------------------------------------------------------------- loader


def test_write_then_load_round_trip(tmp_path: Path) -> None:
    videos = make_procedure_dataset(seed=5, **SMALL)
    root = write_feature_dataset(videos, tmp_path / "ds")
    assert sorted(p.name for p in root.iterdir()) == ["data_splits.json", "dataset.json", "features"]
    loaded = load_feature_dataset(root)
    assert [(v.task, v.name) for v in loaded] == [(v.task, v.name) for v in videos]
    for a, b in zip(videos, loaded, strict=True):
        assert b.features.dtype == np.float32
        np.testing.assert_array_equal(a.features, b.features)
        assert a.times == b.times
    only = load_feature_dataset(root, tasks=["t1"])
    assert {v.task for v in only} == {"t1"} and len(only) == 6
    splits = load_splits(root / "data_splits.json", loaded)
    assert splits == make_splits(videos)


def _write(root: Path, data: object, features: dict[str, np.ndarray]) -> Path:
    (root / "features").mkdir(parents=True, exist_ok=True)
    for handle, array in features.items():
        np.save(root / "features" / f"{handle}.npy", array)
    (root / "dataset.json").write_text(json.dumps(data))
    return root


def _one(handle: str, actions: list, starts: list, ends: list) -> dict:
    return {
        "handles": [handle],
        "hdl_actions": [actions],
        "hdl_start_times": [starts],
        "hdl_end_times": [ends],
    }


def test_json_ends_are_exclusive(tmp_path: Path) -> None:
    root = _write(
        tmp_path, {"A": _one("h", ["SIL", "a", "b"], [0, 3, 7], [3, 7, 10])}, {"h": np.ones((10, 4))}
    )
    (video,) = load_feature_dataset(root)
    assert video.times == {
        "step": ["SIL", "a", "b"],
        "start_frame": [0, 3, 7],
        "end_frame": [2, 6, 9],
        "name": "h",
    }
    assert video.task == "A" and video.features.dtype == np.float32


def test_fps_rescale(tmp_path: Path) -> None:
    # Annotation at 30 fps, features at 10 fps: boundaries x 1/3, rounded half up.
    # 0, 31 -> 10.33 -> 10, 95 -> 31.67 -> 32, 96 -> 32 (segment 'tiny' vanishes with its label), 150 -> 50.
    entry = _one("h", ["a", "b", "tiny", "c"], [0, 31, 95, 96], [31, 95, 96, 150])
    root = _write(tmp_path, {"A": entry}, {"h": np.zeros((50, 3))})
    (video,) = load_feature_dataset(root, annotation_fps=30, feature_fps=10)
    assert video.times["step"] == ["a", "b", "c"]
    assert video.times["start_frame"] == [0, 10, 32]
    assert video.times["end_frame"] == [9, 31, 49]
    with pytest.raises(DataError, match="off by"):  # without the rescale the annotation is 3x too long
        load_feature_dataset(root)
    with pytest.raises(ValueError, match="both"):
        load_feature_dataset(root, annotation_fps=30)


def test_fractional_times_need_fps(tmp_path: Path) -> None:
    root = _write(tmp_path, {"A": _one("h", ["a", "b"], [0, 1.5], [1.5, 4])}, {"h": np.zeros((4, 2))})
    with pytest.raises(DataError, match="non-integer"):
        load_feature_dataset(root)
    (video,) = load_feature_dataset(root, annotation_fps=2, feature_fps=2)
    assert video.times["start_frame"] == [0, 2] and video.times["end_frame"] == [1, 3]


def test_clamps_small_overshoot_and_extends_small_undershoot(tmp_path: Path) -> None:
    data = {
        "A": {
            "handles": ["over", "beyond", "under"],
            "hdl_actions": [["a", "b"], ["a", "b", "late"], ["a", "b"]],
            "hdl_start_times": [[0, 4], [0, 4, 10], [0, 4]],
            "hdl_end_times": [[4, 11], [4, 10, 11], [4, 9]],
        }
    }
    root = _write(tmp_path, data, {h: np.zeros((10, 2)) for h in data["A"]["handles"]})
    over, beyond, under = load_feature_dataset(root)
    assert over.times["end_frame"] == [3, 9] and over.times["step"] == ["a", "b"]
    # The segment starting at frame 10 of a 10-frame video is dropped together with its label.
    assert beyond.times["step"] == ["a", "b"]
    assert beyond.times["start_frame"] == [0, 4] and beyond.times["end_frame"] == [3, 9]
    assert under.times["end_frame"] == [3, 9]
    with pytest.raises(DataError, match="'over'"):
        load_feature_dataset(root, max_overshoot_frames=0)


def _good() -> tuple[dict, dict[str, np.ndarray]]:
    data = {
        "A": {
            "handles": ["a1", "a2"],
            "hdl_actions": [["SIL", "x", "y"], ["x", "y"]],
            "hdl_start_times": [[0, 2, 5], [0, 4]],
            "hdl_end_times": [[2, 5, 8], [4, 9]],
        },
        "B": _one("b1", ["z"], [0], [6]),
    }
    rng = np.random.default_rng(0)
    feats = {"a1": rng.normal(size=(8, 3)), "a2": rng.normal(size=(9, 3)), "b1": rng.normal(size=(6, 3))}
    return data, feats


def _set(path: str, value: object) -> Callable[[dict, dict], None]:
    """Mutator setting data[task][key][i][j] = value for a dotted path 'task.key.i.j'."""

    def mutate(data: dict, feats: dict) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node = data
        for p in parents:
            node = node[p]
        node[last] = value

    return mutate


def _feat(handle: str, value: np.ndarray | None) -> Callable[[dict, dict], None]:
    def mutate(data: dict, feats: dict) -> None:
        if value is None:
            del feats[handle]
        else:
            feats[handle] = value

    return mutate


def _nan_at(handle: str, frame: int, value: float) -> Callable[[dict, dict], None]:
    def mutate(data: dict, feats: dict) -> None:
        feats[handle][frame, 0] = value

    return mutate


def _drop_key(task: str, key: str) -> Callable[[dict, dict], None]:
    def mutate(data: dict, feats: dict) -> None:
        del data[task][key]

    return mutate


def _append(path: str, value: object) -> Callable[[dict, dict], None]:
    def mutate(data: dict, feats: dict) -> None:
        node = data
        for p in [int(p) if p.isdigit() else p for p in path.split(".")]:
            node = node[p]
        node.append(value)

    return mutate


def _all(*mutators: Callable[[dict, dict], None]) -> Callable[[dict, dict], None]:
    def mutate(data: dict, feats: dict) -> None:
        for m in mutators:
            m(data, feats)

    return mutate


# (id, mutation, substrings the message must contain besides the JSON file name)
BAD_CASES = [
    ("missing_feature_file", _feat("a2", None), ["'a2'", "a2.npy"]),
    ("end_before_start", _set("A.hdl_end_times.0.1", 1), ["'a1'", "segment 1", "< start"]),
    ("not_contiguous", _set("A.hdl_start_times.0.2", 6), ["'a1'", "segment 1", "not contiguous"]),
    ("not_starting_at_zero", _set("A.hdl_start_times.1.0", 1), ["'a2'", "segment 0"]),
    ("far_beyond_video", _set("A.hdl_end_times.1.1", 14), ["'a2'", "off by +5"]),
    (
        "segment_far_beyond",
        _all(
            _append("A.hdl_actions.1", "late"),
            _append("A.hdl_start_times.1", 9),
            _append("A.hdl_end_times.1", 14),
        ),
        ["'a2'", "segment 2 starts beyond"],
    ),
    ("far_short_of_video", _set("A.hdl_end_times.1.1", 5), ["'a2'", "off by -4"]),
    ("handle_twice_in_task", _set("A.handles.1", "a1"), ["'a1'", "twice"]),
    ("handle_twice_across_tasks", _set("B.handles.0", "a1"), ["'a1'", "twice", "'A'"]),
    ("nan_features", _nan_at("a1", 3, np.nan), ["'a1'", "a1.npy", "frame 3"]),
    ("inf_features", _nan_at("b1", 0, np.inf), ["'b1'", "b1.npy", "frame 0"]),
    ("float32_overflow", _nan_at("b1", 2, 1e300), ["'b1'", "frame 2"]),
    ("features_1d", _feat("a2", np.zeros(9)), ["'a2'", "a2.npy", "(9,)"]),
    ("features_3d", _feat("a2", np.zeros((9, 3, 1))), ["'a2'", "a2.npy"]),
    ("features_empty", _feat("a2", np.zeros((0, 3))), ["'a2'", "empty"]),
    ("features_dim_mismatch", _feat("a2", np.zeros((9, 4))), ["'a2'", "D=4"]),
    ("features_not_numeric", _feat("a2", np.array([["x"] * 3] * 9)), ["'a2'", "dtype"]),
    ("missing_key", _drop_key("A", "hdl_end_times"), ["'A'", "hdl_end_times"]),
    ("fewer_actions_than_handles", _set("A.hdl_actions", [["SIL", "x", "y"]]), ["'a2'", "hdl_actions"]),
    ("more_starts_than_handles", _append("A.hdl_start_times", [0]), ["'A'", "hdl_start_times"]),
    ("segment_lists_differ", _append("A.hdl_end_times.0", 9), ["'a1'", "lengths differ"]),
    ("no_segments", _set("B", _one("b1", [], [], [])), ["'b1'", "no segments"]),
    ("time_not_number", _set("A.hdl_start_times.0.1", "2"), ["'a1'", "segment 1"]),
    ("label_not_string", _set("A.hdl_actions.0.1", None), ["'a1'", "segment 1"]),
    ("actions_not_list", _set("A.hdl_actions.0", "SIL x y"), ["'a1'", "hdl_actions"]),
    ("task_not_object", _set("B", ["b1"]), ["'B'"]),
    ("handle_is_a_path", _set("B.handles.0", "../b1"), ["'../b1'", "plain file name"]),
]


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_malformed_input_raises_data_error(
    tmp_path: Path, mutate: Callable[[dict, dict], None], expected: list[str]
) -> None:
    data, feats = _good()
    load_feature_dataset(_write(tmp_path / "good", data, feats))  # the unmutated dataset loads
    mutate(data, feats)
    root = _write(tmp_path / "bad", data, feats)
    with pytest.raises(DataError) as info:
        load_feature_dataset(root)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "dataset.json" in message
    for part in expected:
        assert part in message, (part, message)


def test_top_level_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"dataset\.json.*not found"):
        load_feature_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset\.json.*invalid JSON"):
        load_feature_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text("[]")
    with pytest.raises(DataError, match=r"dataset\.json.*JSON object"):
        load_feature_dataset(tmp_path)
    data, feats = _good()
    _write(tmp_path, data, feats)
    with pytest.raises(DataError, match=r"dataset\.json.*'C'"):
        load_feature_dataset(tmp_path, tasks=["A", "C"])


# ---------------------------------------------------------------- splits


def test_make_splits_deterministic_disjoint_covering(dataset: list[Video]) -> None:
    splits = make_splits(dataset)
    assert splits == make_splits(list(reversed(dataset)))  # independent of input order
    assert splits != make_splits(dataset, seed=7)
    for task in {v.task for v in dataset}:
        parts = [set(splits[name][task]) for name in SPLIT_NAMES]
        assert [len(p) for p in parts] == [18, 2, 4]  # 24 videos at 75/10/15, rounded half up
        assert set.union(*parts) == {v.name for v in dataset if v.task == task}
        assert sum(len(p) for p in parts) == 24  # disjoint


def test_make_splits_is_stable_per_task(dataset: list[Video]) -> None:
    only_t1 = make_splits([v for v in dataset if v.task == "t1"])
    full = make_splits(dataset)
    assert all(only_t1[name]["t1"] == full[name]["t1"] for name in SPLIT_NAMES)


@pytest.mark.parametrize(("n", "counts"), [(1, (1, 0, 0)), (2, (1, 0, 1)), (3, (1, 1, 1)), (4, (2, 1, 1))])
def test_make_splits_small_tasks(n: int, counts: tuple[int, int, int]) -> None:
    videos = [Video(f"h{i}", "T", np.zeros((2, 1), np.float32), {}) for i in range(n)]
    splits = make_splits(videos)
    assert tuple(len(splits[name]["T"]) for name in SPLIT_NAMES) == counts


def test_make_splits_rejects_bad_fractions(dataset: list[Video]) -> None:
    with pytest.raises(ValueError, match="fractions"):
        make_splits(dataset, fractions=(0.8, 0.1, 0.2))


def test_splits_save_load_round_trip_and_select(tmp_path: Path, dataset: list[Video]) -> None:
    splits = make_splits(dataset)
    path = tmp_path / "sub" / "data_splits.json"
    save_splits(splits, path)
    assert [p.name for p in path.parent.iterdir()] == ["data_splits.json"]  # no temp file left behind
    assert set(json.loads(path.read_text())["t0"]) == set(SPLIT_NAMES)
    assert load_splits(path, dataset) == splits
    test_videos = select(dataset, splits, "test")
    assert [(v.task, v.name) for v in test_videos] == [(t, h) for t, hs in splits["test"].items() for h in hs]
    # a subset of tasks loads only those tasks' splits
    subset = [v for v in dataset if v.task == "t2"]
    assert load_splits(path, subset) == {name: {"t2": splits[name]["t2"]} for name in SPLIT_NAMES}
    with pytest.raises(KeyError):
        select(dataset, splits, "holdout")
    with pytest.raises(DataError, match="not among the videos"):
        select(subset, splits, "train")


def test_splits_written_without_tasks_still_load_for_one_task(tmp_path: Path, dataset: list[Video]) -> None:
    """The split -> handles form that slots run dirs hold from before the task-keyed format resumes."""
    one_task = [v for v in dataset if v.task == "t1"]
    splits = make_splits(one_task)
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({name: splits[name]["t1"] for name in SPLIT_NAMES}))
    assert load_splits(path, one_task) == splits
    with pytest.raises(DataError, match="splits without tasks, but the videos have tasks"):
        load_splits(path, dataset)


def _bad_splits(tmp_path: Path, dataset: list[Video], mutate: Callable[[dict], None]) -> str:
    path = tmp_path / "data_splits.json"
    save_splits(make_splits(dataset), path)
    raw = json.loads(path.read_text())
    mutate(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError) as info:
        load_splits(path, dataset)
    assert "data_splits.json" in str(info.value)
    return str(info.value)


def test_load_splits_unknown_handle(tmp_path: Path, dataset: list[Video]) -> None:
    message = _bad_splits(tmp_path, dataset, lambda raw: raw["t1"]["val"].append("t1_v999"))
    assert "'t1'" in message and "'val'" in message and "'t1_v999'" in message
    # a handle of another task is unknown in this task
    message = _bad_splits(tmp_path, dataset, lambda raw: raw["t0"]["test"].append("t1_v000"))
    assert "'t0'" in message and "'test'" in message and "'t1_v000'" in message


def test_load_splits_handle_in_two_splits(tmp_path: Path, dataset: list[Video]) -> None:
    def mutate(raw: dict) -> None:
        raw["t2"]["test"].append(raw["t2"]["train"][0])

    message = _bad_splits(tmp_path, dataset, mutate)
    assert "'t2'" in message and "also in split 'train'" in message


def test_load_splits_bad_schema(tmp_path: Path, dataset: list[Video]) -> None:
    message = _bad_splits(tmp_path, dataset, lambda raw: raw["t0"].pop("val"))
    assert "'t0'" in message and "keys" in message
