"""Video-family data: pair sampling against its exact distribution, gathering against loops, the
synthetic pushing world, Atari clips, and the Bridge V2 / EgoDex / LIBERO loaders on tiny files written
in their layouts."""

from __future__ import annotations

import pickle
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from scipy.stats import chisquare

from core.data.clips import VideoClip, resize_frames, sample_pairs, split_clips
from core.data.errors import DataError
from core.data.frames import MemoryFrames, pair_labels, read_pairs
from core.data.moving_objects import AGENT_COLOUR, _push, direction_vectors, make_moving_objects
from core.data.sources import load_clips, num_action_classes
from tests.reference.video_pairs import gather_pairs_loop, pair_labels_loop, pair_pmf

DATA_CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "data"
SMALL_MO = {"num_videos": 12, "frames": 12}


def _config(name: str, **overrides: object) -> DictConfig:
    cfg = OmegaConf.load(DATA_CONFIGS / f"{name}.yaml")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))


def _clip(name: str, length: int, seed: int, size: int = 6, task: str = "t") -> VideoClip:
    rng = np.random.default_rng(seed)
    return VideoClip(
        name=name,
        frames=rng.integers(0, 256, size=(length, size, size, 3), dtype=np.uint8),
        actions=rng.normal(size=(length - 1, 2)).astype(np.float32),
        action_labels=rng.integers(0, 5, size=length - 1).astype(np.int64),
        task=task,
    )


# ---------------------------------------------------------------- pair sampling


def test_sampled_pairs_stay_inside_their_video_and_weights_follow_the_gap() -> None:
    lengths = [2, 3, 7, 40]
    s = sample_pairs(lengths, 20_000, k_max=10, generator=torch.Generator().manual_seed(0))
    n = torch.tensor(lengths)[s.video]
    assert s.video.dtype == s.t.dtype == s.k.dtype == torch.int64 and s.weight.dtype == torch.float32
    assert bool((s.k >= 1).all()) and bool((s.t >= 0).all())
    assert bool((s.t + s.k < n).all()), "t + k must index a frame of the same video"
    assert bool((s.k <= torch.clamp(n - 1, max=10)).all())
    torch.testing.assert_close(s.weight, torch.exp(-0.7 * (s.k - 1).float()))
    assert int(s.k[s.video == 3].max()) == 10 and int(s.k[s.video == 0].max()) == 1


def test_pair_distribution_matches_the_formula_exactly() -> None:
    # chi-square over every (video, t, k) cell against the loop-computed pmf; unequal lengths exercise
    # the per-video truncation of p(k). The sampler is seeded, so the test is deterministic.
    lengths, k_max, decay, n = [1, 2, 5, 9, 14], 6, 0.3, 300_000
    s = sample_pairs(lengths, n, k_max=k_max, gap_decay=decay, generator=torch.Generator().manual_seed(3))
    counts = Counter(zip(s.video.tolist(), s.t.tolist(), s.k.tolist(), strict=True))
    pmf = pair_pmf(lengths, k_max, decay)
    assert set(counts) <= set(pmf), "sampled a pair outside the support"
    cells = sorted(pmf)
    observed = np.array([counts.get(c, 0) for c in cells])
    assert chisquare(observed, n * np.array([pmf[c] for c in cells])).pvalue > 1e-3
    # ... and the same counts reject a slightly different gap decay, so the test has power
    wrong = pair_pmf(lengths, k_max, decay + 0.1)
    assert chisquare(observed, n * np.array([wrong[c] for c in cells])).pvalue < 1e-6


def test_gap_frequencies_follow_exp_decay_on_long_videos() -> None:
    s = sample_pairs([50] * 8, 400_000, k_max=10, gap_decay=0.3, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(s.k, minlength=11)[1:].double() / len(s.k)
    expected = torch.exp(-0.3 * torch.arange(10, dtype=torch.float64))
    torch.testing.assert_close(freq, expected / expected.sum(), atol=3e-3, rtol=0)


def test_pair_sampling_is_reproducible_from_the_generator() -> None:
    a, b, c = (sample_pairs([5, 9], 64, 4, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a.t, c.t) or not torch.equal(a.video, c.video)


def test_pair_sampling_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="2 or more frames"):
        sample_pairs([1, 1], 4, 3)
    with pytest.raises(ValueError, match="k_max"):
        sample_pairs([5], 4, 0)
    assert sample_pairs([5], 0, 3).video.shape == (0,)


# ---------------------------------------------------------------- gathering and labels


def _floats(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255


@pytest.mark.parametrize("lengths", [(8, 8, 8), (3, 11, 6, 2)])
def test_read_pairs_and_labels_match_the_loop(lengths: tuple[int, ...]) -> None:
    clips = [_clip(f"c{i}", n, seed=i) for i, n in enumerate(lengths)]
    s = sample_pairs(lengths, 300, k_max=5, generator=torch.Generator().manual_seed(0))
    want_t, want_tk = gather_pairs_loop(clips, s.video, s.t, s.k)
    store = MemoryFrames(clips)
    img_t, img_tk = read_pairs(store, range(len(clips)), s)
    assert img_t.shape == (300, 6, 6, 3) and img_t.dtype == np.uint8
    torch.testing.assert_close(_floats(img_t), want_t, rtol=0, atol=0)
    torch.testing.assert_close(_floats(img_tk), want_tk, rtol=0, atol=0)
    assert torch.equal(pair_labels(store.clips, s), pair_labels_loop(clips, s.video, s.t))
    # a split's clips are a subset of the store: sample.video indexes the split's list
    subset = [len(clips) - 1, 0]
    s2 = sample_pairs([lengths[i] for i in subset], 50, k_max=1, generator=torch.Generator().manual_seed(1))
    sub_t, _ = read_pairs(store, subset, s2)
    want_sub, _ = gather_pairs_loop([clips[i] for i in subset], s2.video, s2.t, s2.k)
    torch.testing.assert_close(_floats(sub_t), want_sub, rtol=0, atol=0)


def test_memory_frames_rejects_clips_of_different_sizes() -> None:
    clips = [_clip("a", 4, 0, size=6), _clip("b", 4, 1, size=8)]
    with pytest.raises(ValueError, match="one square frame size"):
        MemoryFrames(clips)


def test_video_clip_checks_its_arrays() -> None:
    frames = np.zeros((4, 5, 5, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="actions"):
        VideoClip("x", frames, np.zeros((4, 2), np.float32), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="action_labels"):
        VideoClip("x", frames, np.zeros((3, 2), np.float32), np.zeros(3, np.int32))


def test_split_by_video_is_disjoint_complete_stratified_and_order_free() -> None:
    clips = [_clip(f"{task}_{i}", 3, seed=i, task=task) for task in ("a", "b") for i in range(10)]
    splits = split_clips(clips, (0.6, 0.2, 0.2), seed=1)
    names = {k: {c.name for c in v} for k, v in splits.items()}
    assert sum(len(v) for v in names.values()) == 20 and len(set().union(*names.values())) == 20
    for part, count in (("train", 6), ("val", 2), ("test", 2)):  # per task
        assert sum(c.task == "a" for c in splits[part]) == count == sum(c.task == "b" for c in splits[part])
    again = split_clips(clips[::-1], (0.6, 0.2, 0.2), seed=1)
    assert {k: {c.name for c in v} for k, v in again.items()} == names


def test_resize_center_crops_or_squashes() -> None:
    frame = np.zeros((1, 4, 8, 3), dtype=np.uint8)
    frame[:, :, :2] = 255  # white left border, outside the centred 4x4 square
    assert resize_frames(frame, 4, "center").max() == 0
    squashed = resize_frames(frame, 4, "squash")
    assert squashed.shape == (1, 4, 4, 3) and squashed[0, :, 0].min() > 150 and squashed[0, :, 3].max() == 0
    same = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    assert np.array_equal(resize_frames(same, 4), same)


# ---------------------------------------------------------------- synthetic pushing world


def _agent_centres(frames: np.ndarray) -> np.ndarray:
    """(T, 2) centroid of the agent, weighting pixels by how close they are to the agent's red."""
    f = frames.astype(np.float64)
    red = np.clip((f[..., 0] - f[..., 1]) / 190, 0, 1) * np.clip((f[..., 0] - f[..., 2]) / 190, 0, 1)
    ys, xs = np.mgrid[: frames.shape[1], : frames.shape[2]]
    return np.stack([(red * xs).sum((1, 2)), (red * ys).sum((1, 2))], 1) / red.sum((1, 2))[:, None]


def test_moving_objects_are_deterministic_and_stable_when_counts_change() -> None:
    a, b = make_moving_objects(seed=3, **SMALL_MO), make_moving_objects(seed=3, **SMALL_MO)
    c = make_moving_objects(seed=4, **SMALL_MO)
    more = make_moving_objects(seed=3, num_videos=40, frames=12)
    for x, y, z in zip(a, b, more, strict=False):
        assert x.name == y.name == z.name
        assert np.array_equal(x.frames, y.frames) and np.array_equal(x.frames, z.frames)
        assert np.array_equal(x.action_labels, z.action_labels)
    assert not np.array_equal(a[0].frames, c[0].frames)


def test_moving_objects_shapes_actions_and_held_labels() -> None:
    clips = make_moving_objects(seed=0, num_videos=30, frames=16, image_size=24, segment_len=(3, 5))
    dirs = direction_vectors(8)
    for clip in clips:
        assert clip.frames.shape == (16, 24, 24, 3) and clip.frames.dtype == np.uint8
        assert clip.actions.shape == (15, 3) and clip.action_labels.shape == (15,)
        direction, speed = np.divmod(clip.action_labels, 2)
        np.testing.assert_allclose(clip.actions[:, :2], dirs[direction], atol=1e-6)
        np.testing.assert_allclose(clip.actions[:, 2], np.array([0.03, 0.06])[speed], rtol=1e-6)
        # an action is held for >= 3 steps, except a segment cut by the clip's end
        runs = np.diff(np.flatnonzero(np.diff(clip.action_labels) != 0))
        assert (runs >= 3).all()
    assert num_action_classes(_config("moving_objects")) == 8  # 4 directions x 2 speeds in the yaml


def test_moving_objects_label_is_visible_in_the_pair() -> None:
    # the agent's displacement between frame t and t+1 points in the labelled direction, every step
    clips = make_moving_objects(seed=1, num_videos=60, frames=20)
    dirs = direction_vectors(8)
    hits = total = 0
    for clip in clips:
        step = np.diff(_agent_centres(clip.frames), axis=0)  # (T-1, 2)
        hits += int((np.argmax(step @ dirs.T, axis=1) == clip.action_labels // 2).sum())
        total += len(step)
        speed = np.linalg.norm(step, axis=1) / 32
        fast = clip.action_labels % 2 == 1
        assert speed[fast].min(initial=1) > speed[~fast].max(initial=0) - 0.01
    assert hits / total > 0.99


def test_push_moves_touching_shapes_out_along_the_least_overlap_and_keeps_them_inside() -> None:
    agent = np.array([[10.0, 10.0]])  # (V=1, 2), half size 2
    objects = np.array([[[13.0, 10.5], [10.0, 20.0], [13.0, 10.0], [30.5, 10.0]]])  # (1, O=4, 2)
    half = np.array([[2.0, 2.0, 2.0, 2.0]])
    active = np.array([[True, True, False, True]])
    step = np.array([[1.0, 0.0]])
    moved = _push(agent, 2.0, objects, half, active, step, size=32.0)
    np.testing.assert_allclose(moved[0, 0], [14.0, 10.5])  # x overlap 1 < y overlap 3.5: pushed right by 1
    np.testing.assert_allclose(moved[0, 1:3], objects[0, 1:3])  # apart, or inactive: untouched
    np.testing.assert_allclose(moved[0, 3], [30.0, 10.0])  # clamped inside the right wall
    wall = _push(
        np.array([[27.0, 10.0]]), 2.0, np.array([[[30.0, 10.0]]]), half[:, :1], active[:, :1], step, 32.0
    )
    np.testing.assert_allclose(wall[0, 0], [30.0, 10.0])  # against the wall it cannot yield


def test_generated_shapes_are_pushed_by_the_agent() -> None:
    clips = make_moving_objects(seed=2, num_videos=40, frames=20, num_objects=(3, 3))
    colour = np.asarray(AGENT_COLOUR)
    moved = 0
    for clip in clips:
        f = clip.frames.astype(int)
        near_agent = _dilate(np.abs(f - colour).sum(-1) < 150, 3)  # (T, S, S) agent and its surroundings
        shapes = (np.abs(f - f[:, :1, :1]).sum(-1) > 30) & ~near_agent  # shape pixels away from the agent
        # a pushed shape leaves pixels it covered even where the agent is not
        moved += int((shapes[1:] & ~near_agent[:-1] & ~shapes[:-1]).any())
    assert moved >= 10


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            out |= np.roll(mask, (dy, dx), axis=(1, 2))
    return out


def test_moving_objects_reject_settings_without_a_legal_direction() -> None:
    with pytest.raises(ValueError, match="segment length"):
        make_moving_objects(speeds=(0.1,), segment_len=(3, 6))
    with pytest.raises(ValueError, match="directions"):
        make_moving_objects(directions=6)


# ---------------------------------------------------------------- Atari (ale-py ships the ROMs)


def test_atari_clips_are_real_deterministic_play_with_their_actions() -> None:
    pytest.importorskip("ale_py")
    from core.data.atari import action_names, make_atari_clips

    cfg = _config("atari", **{"generator.num_videos": 10, "generator.frames": 16})
    clips = load_clips(cfg)
    again = make_atari_clips(game="breakout", num_videos=12, frames=16, image_size=64)
    assert [c.name for c in clips] == [f"breakout_{i:04d}" for i in range(10)]
    for a, b in zip(clips, again, strict=False):
        assert np.array_equal(a.frames, b.frames) and np.array_equal(a.action_labels, b.action_labels)
    names = action_names("breakout")
    assert names == ["NOOP", "FIRE", "RIGHT", "LEFT"] and num_action_classes(cfg) == 4
    paddle_dx: dict[str, list[float]] = {"RIGHT": [], "LEFT": []}
    for clip in clips:
        assert clip.frames.shape == (16, 64, 64, 3)
        assert np.array_equal(clip.actions, np.eye(4, dtype=np.float32)[clip.action_labels])
        band = clip.frames[:, 55:61].astype(float)  # the paddle's rows after squashing 210 -> 64
        paddle = (band[..., 0] - band[..., 1] > 40).sum(1)  # (T, 64) red paddle pixels per column
        x = (paddle * np.arange(64)).sum(1) / np.maximum(paddle.sum(1), 1)
        for label, dx in zip(clip.action_labels, np.diff(x), strict=True):
            if names[label] in paddle_dx:
                paddle_dx[names[label]].append(dx)
    # the emulator really follows the recorded actions: RIGHT moves the paddle right, LEFT left
    assert np.mean(paddle_dx["RIGHT"]) > 1.0 and np.mean(paddle_dx["LEFT"]) < -1.0


def test_atari_unknown_game_is_a_data_error() -> None:
    pytest.importorskip("ale_py")
    from core.data.atari import make_atari_clips

    with pytest.raises(DataError, match="breakout"):
        make_atari_clips(game="breakot", num_videos=1)


# ---------------------------------------------------------------- Bridge V2 raw

BRIDGE_ACTIONS = np.array(
    [
        [0.02, 0.001, 0, 0, 0, 0, 1],
        [0, -0.03, 0.01, 0, 0, 0, 1],
        [0, 0, 0.015, 0, 0, 0, 0],
        [0.001, 0, 0, 0, 0, 0, 0],
    ],
    dtype=np.float32,
)
BRIDGE_LABELS = [0, 3, 4, 6]  # +x, -y, +z, still (|a| <= 0.005)


def _upright_frames(count: int, height: int, width: int) -> np.ndarray:
    """Bright top half, dark bottom half whose level encodes the frame index (to check order)."""
    frames = np.zeros((count, height, width, 3), dtype=np.uint8)
    frames[:, : height // 2] = 230
    frames[:, height // 2 :] = (10 + 15 * np.arange(count))[:, None, None, None]
    return frames


def _write_bridge_traj(traj: Path, actions: np.ndarray, as_dicts: bool = True) -> None:
    from PIL import Image

    (traj / "images0").mkdir(parents=True)
    for t, frame in enumerate(_upright_frames(len(actions) + 1, 24, 32)):
        Image.fromarray(frame).save(traj / "images0" / f"im_{t}.jpg", quality=95)
    entries = (
        [{"actions": a, "new_robot_transform": np.eye(4)} for a in actions] if as_dicts else list(actions)
    )
    (traj / "policy_out.pkl").write_bytes(pickle.dumps(entries))
    (traj / "lang.txt").write_text("put the spoon in the pot\nconfidence: 1\n")


def _bridge_root(tmp_path: Path) -> Path:
    root = tmp_path / "bridge"
    raw = root / "datacol1_toykitchen1" / "put_spoon" / "00" / "2023-03-15_14-35-28" / "raw"
    _write_bridge_traj(raw / "traj_group0" / "traj0", BRIDGE_ACTIONS)
    _write_bridge_traj(raw / "traj_group0" / "traj1", BRIDGE_ACTIONS[::-1], as_dicts=False)
    return root


def _assert_upright_and_ordered(frames: np.ndarray) -> None:
    size = frames.shape[1]
    top = frames[:, : size // 2 - 1].mean((1, 2, 3))
    bottom = frames[:, size // 2 + 1 :].mean((1, 2, 3))
    assert (top > 200).all() and (bottom < top - 50).all(), "frames must be upright (bright half on top)"
    assert (np.diff(bottom) > 5).all(), "frames must keep their order"


def test_bridge_raw_loads_upright_frames_with_aligned_actions(tmp_path: Path) -> None:
    clips = load_clips(_config("bridge", root=_bridge_root(tmp_path), image_size=12))
    assert [c.name for c in clips] == [
        f"datacol1_toykitchen1/put_spoon/00/2023-03-15_14-35-28/raw/traj_group0/traj{i}" for i in (0, 1)
    ]
    first, second = clips
    assert first.frames.shape == (5, 12, 12, 3)
    _assert_upright_and_ordered(first.frames)
    np.testing.assert_array_equal(first.actions, BRIDGE_ACTIONS)
    np.testing.assert_array_equal(second.actions, BRIDGE_ACTIONS[::-1])
    assert (
        first.action_labels.tolist() == BRIDGE_LABELS and second.action_labels.tolist() == BRIDGE_LABELS[::-1]
    )
    assert first.instruction == "put the spoon in the pot" and first.task == "datacol1_toykitchen1/put_spoon"


def _damage_bridge(traj: Path, damage: str) -> tuple[Path, str]:
    """Break one trajectory; returns (the file the error must name, the problem it must state)."""
    if damage == "no_images0":
        shutil.rmtree(traj / "images0")
        return traj / "images0", "missing camera folder"
    if damage == "frame_gap":
        (traj / "images0" / "im_2.jpg").unlink()
        return traj / "images0", "im_2.jpg is missing"
    if damage == "bad_jpg":
        (traj / "images0" / "im_1.jpg").write_bytes(b"garbage")
        return traj / "images0" / "im_1.jpg", "unreadable image"
    policy = traj / "policy_out.pkl"
    if damage == "action_count":
        policy.write_bytes(pickle.dumps([{"actions": np.zeros(7)}] * 3))
        return policy, "3 actions for 5 frames"
    if damage == "bad_pickle":
        policy.write_bytes(b"not a pickle")
        return policy, "unreadable pickle"
    policy.unlink()
    return policy, "missing"


@pytest.mark.parametrize(
    "damage", ["no_images0", "frame_gap", "bad_jpg", "action_count", "bad_pickle", "no_actions"]
)
def test_bridge_malformed_trajectory_names_the_file(tmp_path: Path, damage: str) -> None:
    root = _bridge_root(tmp_path)
    culprit, problem = _damage_bridge(next(root.glob("**/traj1")), damage)
    with pytest.raises(DataError, match=re.escape(problem)) as err:
        load_clips(_config("bridge", root=root, image_size=12))
    assert str(err.value).startswith(f"{culprit}:")


def test_real_data_configs_need_a_root(tmp_path: Path) -> None:
    for name in ("bridge", "egodex", "libero"):
        with pytest.raises(ValueError, match=r"data\.root is null"):
            load_clips(_config(name))
    with pytest.raises(DataError, match="no Bridge trajectories"):
        load_clips(_config("bridge", root=tmp_path))


# ---------------------------------------------------------------- EgoDex

EGO_STEPS = np.array(
    [[0.01, 0, 0]] * 4 + [[0, 0, -0.01]] * 3 + [[0, 0, 0]], dtype=np.float64
)  # world, per step


def _poses(positions: np.ndarray, rotation: np.ndarray | None = None) -> np.ndarray:
    poses = np.tile(np.eye(4), (len(positions), 1, 1))
    poses[:, :3, 3] = positions
    if rotation is not None:
        poses[:, :3, :3] = rotation
    return poses


def _write_mp4(path: Path, frames: np.ndarray) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30, options={"crf": "10"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())


def _write_egodex_episode(folder: Path, index: int, camera: np.ndarray, frames: int | None = None) -> None:
    import h5py

    folder.mkdir(parents=True, exist_ok=True)
    hand = np.cumsum(np.concatenate([[[0.1, 0.2, 0.3]], EGO_STEPS]), axis=0)  # (N, 3) positions
    _write_mp4(folder / f"{index}.mp4", _upright_frames(frames or len(hand), 48, 64))
    with h5py.File(folder / f"{index}.hdf5", "w") as f:
        f.create_dataset("transforms/rightHand", data=_poses(hand))
        f.create_dataset("transforms/leftHand", data=_poses(np.zeros_like(hand)))
        f.create_dataset("transforms/camera", data=camera)
        f.create_dataset("camera/intrinsic", data=np.eye(3))
        f.attrs["llm_description"] = "pick up the cup"


def _egodex_root(tmp_path: Path) -> Path:
    pytest.importorskip("av")
    pytest.importorskip("h5py")
    root = tmp_path / "egodex"
    n = len(EGO_STEPS) + 1
    _write_egodex_episode(root / "part1" / "pick_cup", 0, _poses(np.zeros((n, 3))))
    # camera turned 90 degrees about z: its x axis is the world's y, so world +x reads as camera -y
    turn = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    _write_egodex_episode(root / "test" / "pick_cup", 1, _poses(np.zeros((n, 3)), turn))
    return root


def test_egodex_loads_mp4_frames_and_camera_frame_hand_motion(tmp_path: Path) -> None:
    root = _egodex_root(tmp_path)
    clips = load_clips(_config("egodex", root=root, image_size=16))
    assert [c.name for c in clips] == ["part1/pick_cup/0", "test/pick_cup/1"]
    still_camera, turned = clips
    assert still_camera.frames.shape == (9, 16, 16, 3) and still_camera.task == "pick_cup"
    _assert_upright_and_ordered(still_camera.frames)
    np.testing.assert_allclose(still_camera.actions, EGO_STEPS, atol=1e-7)
    assert still_camera.action_labels.tolist() == [0] * 4 + [5] * 3 + [6]  # +x, -z, still
    assert turned.action_labels.tolist() == [3] * 4 + [5] * 3 + [6]  # world +x is camera -y
    assert still_camera.instruction == "pick up the cup"

    world = load_clips(_config("egodex", root=root, image_size=16, reference="world", parts="[test]"))
    assert [c.name for c in world] == ["test/pick_cup/1"] and world[0].action_labels.tolist()[:4] == [0] * 4
    strided = load_clips(_config("egodex", root=root, image_size=16, frame_stride=2, max_videos=1))
    np.testing.assert_allclose(strided[0].actions, EGO_STEPS.reshape(4, 2, 3).sum(1), atol=1e-7)


def test_egodex_head_motion_shows_in_the_camera_frame(tmp_path: Path) -> None:
    pytest.importorskip("av")
    pytest.importorskip("h5py")
    n = len(EGO_STEPS) + 1
    camera = _poses(np.stack([0.02 * np.arange(n), np.zeros(n), np.zeros(n)], 1))  # head moves +x fast
    _write_egodex_episode(tmp_path / "part2" / "wipe", 0, camera)
    clip = load_clips(_config("egodex", root=tmp_path, image_size=16))[0]
    assert clip.action_labels.tolist() == [1] * 4 + [1] * 3 + [1]  # the hand drifts left in the image


@pytest.mark.parametrize("damage", ["unreadable_mp4", "missing_joint", "frame_count", "missing_hdf5"])
def test_egodex_malformed_episode_names_the_file(tmp_path: Path, damage: str) -> None:
    h5py = pytest.importorskip("h5py")
    root = _egodex_root(tmp_path)
    folder = root / "test" / "pick_cup"
    if damage == "unreadable_mp4":
        (folder / "1.mp4").write_bytes(b"\x00" * 64)
        culprit, problem = folder / "1.mp4", "cannot decode video"
    elif damage == "missing_joint":
        with h5py.File(folder / "1.hdf5", "a") as f:
            del f["transforms/rightHand"]
        culprit, problem = folder / "1.hdf5", "missing dataset 'transforms/rightHand'"
    elif damage == "frame_count":
        _write_mp4(folder / "1.mp4", _upright_frames(5, 48, 64))
        culprit, problem = folder / "1.mp4", "5 video frames but 9 poses"
    else:
        (folder / "1.hdf5").unlink()
        culprit, problem = folder / "1.hdf5", "missing"
    with pytest.raises(DataError, match=problem) as err:
        load_clips(_config("egodex", root=root, image_size=16))
    assert str(err.value).startswith(f"{culprit}:")


# ---------------------------------------------------------------- LIBERO

LIBERO_ACTIONS = np.array(
    [
        [0.5, 0, 0, 0, 0, 0, -1],
        [0, 0, -0.6, 0, 0, 0, 1],
        [0.05, 0.02, 0, 0, 0, 0, 1],
        [0, 0.9, 0, 0, 0, 0, 1],
    ],
    dtype=np.float32,
)


def _write_libero(path: Path, demos: tuple[int, ...] = (0, 1, 10)) -> np.ndarray:
    import h5py

    upright = _upright_frames(len(LIBERO_ACTIONS), 16, 16)
    upright[:, :, :3, 1:] = 0  # a red band on the left tells a vertical flip from a rotation
    with h5py.File(path, "w") as f:
        f.create_group("data").attrs["problem_info"] = '{"language_instruction": "open the drawer"}'
        for i in demos:
            f.create_dataset(f"data/demo_{i}/obs/agentview_rgb", data=upright[:, ::-1])  # stored upside down
            f.create_dataset(f"data/demo_{i}/actions", data=LIBERO_ACTIONS * (1 + i))
    return upright


def test_libero_demos_load_upright_in_numeric_order(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    upright = _write_libero(tmp_path / "open_drawer_demo.hdf5")
    clips = load_clips(_config("libero", root=tmp_path, image_size=16))
    assert [c.name for c in clips] == [f"open_drawer_demo/demo_{i}" for i in (0, 1, 10)]
    demo0 = clips[0]
    np.testing.assert_array_equal(demo0.frames, upright)
    np.testing.assert_array_equal(demo0.actions, LIBERO_ACTIONS[:-1])
    np.testing.assert_array_equal(clips[2].actions, 11 * LIBERO_ACTIONS[:-1])
    assert demo0.action_labels.tolist() == [0, 5, 6]  # +x, -z, still (|a| <= 0.1)
    assert demo0.task == "open_drawer_demo" and demo0.instruction == "open the drawer"
    assert num_action_classes(_config("libero", root=tmp_path)) == 7
    rotated = load_clips(
        _config("libero", root=tmp_path / "open_drawer_demo.hdf5", flip="rotate180", max_videos=2)
    )
    assert len(rotated) == 2 and rotated[0].frames.shape == (4, 128, 128, 3)


@pytest.mark.parametrize("damage", ["missing_images", "action_count", "not_hdf5"])
def test_libero_malformed_file_names_it(tmp_path: Path, damage: str) -> None:
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "task.hdf5"
    _write_libero(path)
    if damage == "missing_images":
        with h5py.File(path, "a") as f:
            del f["data/demo_1/obs/agentview_rgb"]
        problem = "missing dataset 'data/demo_1/obs/agentview_rgb'"
    elif damage == "action_count":
        with h5py.File(path, "a") as f:
            del f["data/demo_10/actions"]
            f.create_dataset("data/demo_10/actions", data=LIBERO_ACTIONS[:2])
        problem = r"data/demo_10/actions has shape \(2, 7\), expected \(4"
    else:
        path.write_bytes(b"plain text")
        problem = "unreadable HDF5"
    with pytest.raises(DataError, match=problem) as err:
        load_clips(_config("libero", root=tmp_path, image_size=16))
    assert str(err.value).startswith(f"{path}:")


# ---------------------------------------------------------------- configs


def test_moving_objects_config_loads_and_feeds_the_sampler() -> None:
    cfg = _config("moving_objects", **{"generator.num_videos": 8, "generator.frames": 12})
    clips = load_clips(cfg)
    assert len(clips) == 8 and clips[0].frames.shape == (12, 32, 32, 3)
    train = split_clips(clips, cfg.split_fractions, cfg.split_seed)["train"]
    store = MemoryFrames(train)
    s = sample_pairs(
        [c.num_frames for c in train], cfg.batch_size, **cfg.pairs, generator=torch.Generator().manual_seed(0)
    )
    img_t, img_tk = read_pairs(store, range(len(train)), s)
    assert img_t.shape == img_tk.shape == (cfg.batch_size, 32, 32, 3)
    assert pair_labels(store.clips, s).max() < num_action_classes(cfg)


def test_bad_data_config_keys_are_named() -> None:
    with pytest.raises(ValueError, match=r"data\.image_size"):
        load_clips(_config("moving_objects", image_size=4))
    with pytest.raises(ValueError, match=r"data\.pairs\.k_max"):
        load_clips(_config("moving_objects", **{"pairs.k_max": 0}))
    with pytest.raises(ValueError, match=r"data\.kind"):
        load_clips(_config("moving_objects", kind="nope"))
