"""Object-centric video data: synthetic moving shapes, the frame-folder loader, configs, splits, batches."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from core.data.errors import DataError
from core.data.multi_object import (
    ObjectVideo,
    batch_videos,
    load_frame_folders,
    load_object_videos,
    make_object_videos,
    split_videos,
)

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "data"


@pytest.fixture(scope="module")
def videos() -> list[ObjectVideo]:
    return make_object_videos(num_videos=24, frames=6, image_size=32, max_objects=4, seed=0)


# ---------------------------------------------------------------- synthetic moving shapes


def test_synthetic_shapes_types_and_object_counts(videos: list[ObjectVideo]) -> None:
    counts = set()
    for v in videos:
        assert v.frames.shape == (6, 32, 32, 3) and v.frames.dtype == np.uint8
        assert v.masks is not None and v.masks.shape == (6, 32, 32) and v.masks.dtype == np.int64
        labels = set(np.unique(v.masks).tolist())
        assert 0 in labels and labels - {0} <= {1, 2, 3, 4} and len(labels - {0}) >= 2
        counts.add(int(v.masks.max()))
        assert v.source == v.name
    assert counts == {2, 3, 4}


def test_synthetic_is_deterministic_and_stable_when_the_count_changes(videos: list[ObjectVideo]) -> None:
    again = make_object_videos(num_videos=5, frames=6, image_size=32, max_objects=4, seed=0)
    other = make_object_videos(num_videos=5, frames=6, image_size=32, max_objects=4, seed=1)
    for a, b, c in zip(videos[:5], again, other, strict=True):
        assert a.name == b.name == c.name
        np.testing.assert_array_equal(a.frames, b.frames)
        np.testing.assert_array_equal(a.masks, b.masks)
        assert not np.array_equal(a.masks, c.masks)


def test_synthetic_masks_show_the_visible_colour(videos: list[ObjectVideo]) -> None:
    """Each label's pixels share one colour (up to sensor noise), colours differ: masks match frames."""
    for v in videos:
        frames = v.frames.astype(np.float64)
        means = []
        for label in range(1, int(v.masks.max()) + 1):
            pixels = frames[v.masks == label]  # (P, 3)
            if len(pixels):
                assert pixels.std(axis=0).max() < 6, (v.name, label)
                means.append(pixels.mean(axis=0))
        gaps = [np.abs(a - b).max() for i, a in enumerate(means) for b in means[i + 1 :]]
        assert min(gaps) > 40, v.name
        background = frames[v.masks == 0]
        assert 1.5 < background.std(axis=0).max() < 20  # textured and noisy, yet dim and mild
        assert all(np.abs(background.mean(axis=0) - m).max() > 40 for m in means)


def test_synthetic_objects_move_bounce_and_occlude() -> None:
    videos = make_object_videos(num_videos=32, frames=12, image_size=32, max_objects=4, seed=3)
    objects = occluded = bounced = 0
    for v in videos:
        assert not np.array_equal(v.masks[0], v.masks[-1])
        for label in range(1, int(v.masks.max()) + 1):
            mask = v.masks == label  # (T, H, W)
            area = mask.sum(axis=(1, 2))  # (T,)
            assert area.max() > 0
            objects += 1
            # shapes stay whole inside the frame, so a shrinking visible area means another shape covers it
            occluded += bool(area.min() < 0.6 * area.max())
            centre_x = np.array([np.nonzero(m)[1].mean() if m.any() else np.nan for m in mask])  # (T,)
            step = np.diff(centre_x)
            bounced += bool(np.nanmax(step) > 0.5 and np.nanmin(step) < -0.5)  # moved right and left
    assert occluded >= objects // 6 and bounced >= objects // 4


def test_synthetic_generation_is_fast() -> None:
    start = time.perf_counter()
    make_object_videos(num_videos=64, frames=8, image_size=64, max_objects=4, seed=0)
    assert time.perf_counter() - start < 2.0  # spec: < 1 s; margin for a loaded 2-core CI box


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_objects": 0}, "max_objects"),
        ({"max_objects": 9}, "max_objects"),
        ({"image_size": 8}, "image_size"),
        ({"frames": 0}, "frames"),
    ],
)
def test_synthetic_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_object_videos(**{"num_videos": 2, **kwargs})


def test_single_object_videos_are_allowed() -> None:
    (video,) = make_object_videos(num_videos=1, frames=2, image_size=16, max_objects=1, seed=0)
    assert set(np.unique(video.masks).tolist()) == {0, 1}


# ---------------------------------------------------------------- frame folders


def _write_video(
    root: Path, name: str, frames: np.ndarray, masks: np.ndarray | None = None, suffix: str = ".png"
) -> None:
    """Frames as `frame_{t}` (no zero padding: natural sorting matters), masks as palette PNGs."""
    (root / "frames" / name).mkdir(parents=True, exist_ok=True)
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(root / "frames" / name / f"frame_{t}{suffix}", quality=95, subsampling=0)
    if masks is not None:
        (root / "masks" / name).mkdir(parents=True, exist_ok=True)
        for t, mask in enumerate(masks):
            image = Image.fromarray(mask.astype(np.uint8), mode="P")
            image.putpalette([c for i in range(256) for c in (i * 37 % 256, i * 91 % 256, i * 53 % 256)])
            image.save(root / "masks" / name / f"frame_{t}.png")


def test_frame_folders_round_trip_in_natural_order(tmp_path: Path, videos: list[ObjectVideo]) -> None:
    long = np.concatenate([videos[0].frames, videos[1].frames])  # 12 frames: frame_10 after frame_9
    long_masks = np.concatenate([videos[0].masks, videos[1].masks])
    _write_video(tmp_path, "vid_10", long, long_masks)
    _write_video(tmp_path, "vid_2", videos[2].frames, videos[2].masks)
    (tmp_path / "frames" / "vid_2" / "notes.txt").write_text("not a frame")
    (tmp_path / "frames" / "vid_2" / ".hidden.png").write_bytes(b"junk")

    loaded = load_frame_folders(tmp_path / "frames", ep_length=5, image_size=32, masks_dir=tmp_path / "masks")
    assert [v.name for v in loaded] == ["vid_2_clip000", "vid_10_clip000", "vid_10_clip001"]
    assert [v.source for v in loaded] == ["vid_2", "vid_10", "vid_10"]
    np.testing.assert_array_equal(loaded[0].frames, videos[2].frames[:5])  # remainder frame dropped
    np.testing.assert_array_equal(loaded[1].frames, long[:5])
    np.testing.assert_array_equal(loaded[2].frames, long[5:10])
    np.testing.assert_array_equal(loaded[2].masks, long_masks[5:10])  # palette indices, not colours
    assert loaded[2].masks.dtype == np.int64


def test_frame_folders_without_masks_and_lossy_jpg(tmp_path: Path, videos: list[ObjectVideo]) -> None:
    _write_video(tmp_path, "a", videos[0].frames, suffix=".jpg")
    (loaded,) = load_frame_folders(tmp_path / "frames", ep_length=6, image_size=32)
    assert loaded.masks is None
    assert np.abs(loaded.frames.astype(int) - videos[0].frames).mean() < 6


def test_frame_folders_resize_and_center_crop(tmp_path: Path) -> None:
    # 48 wide x 32 high; columns carry labels 0 | 1 | 2 in 16-pixel stripes
    stripes = np.repeat(np.arange(3), 16)[None, :].repeat(32, axis=0)  # (32, 48)
    frame = np.stack([stripes * 100, stripes * 0, 255 - stripes * 100], axis=-1).astype(np.uint8)
    _write_video(tmp_path, "wide", frame[None].repeat(2, axis=0), stripes[None].repeat(2, axis=0))
    (clip,) = load_frame_folders(
        tmp_path / "frames", ep_length=2, image_size=16, masks_dir=tmp_path / "masks"
    )
    assert clip.frames.shape == (2, 16, 16, 3) and clip.masks.shape == (2, 16, 16)
    # scaled to 24 x 16, then columns 4..19 kept: 4 of stripe 0, 8 of stripe 1, 4 of stripe 2
    expected = [0] * 4 + [1] * 8 + [2] * 4
    assert (clip.masks == np.array(expected)[None, None, :]).all()
    assert clip.frames[0, 8, 8, 0] == 100 and clip.frames[0, 8, 0, 2] > 200 and clip.frames[0, 8, 15, 0] > 190


def _setup_error(tmp_path: Path, case: str, videos: list[ObjectVideo]) -> tuple[Path, Path | None, str]:
    frames, masks = tmp_path / "frames", tmp_path / "masks"
    _write_video(tmp_path, "good", videos[0].frames, videos[0].masks)
    if case == "no_video_folders":
        empty = tmp_path / "empty_root"
        empty.mkdir()
        return empty, None, "empty_root"
    if case == "empty_folder":
        (frames / "empty_vid").mkdir()
        return frames, None, "empty_vid"
    if case == "too_few_frames":
        _write_video(tmp_path, "short", videos[1].frames[:3])
        return frames, None, "short"
    if case == "unreadable_image":
        (frames / "good" / "frame_2.png").write_bytes(b"not a png")
        return frames, None, "frame_2.png"
    if case == "mask_size_mismatch":
        Image.fromarray(np.zeros((20, 32), np.uint8)).save(masks / "good" / "frame_2.png")
        return frames, masks, "frame_2.png"
    if case == "missing_mask_file":
        (masks / "good" / "frame_3.png").unlink()
        return frames, masks, "frame_3.png"
    if case == "missing_mask_folder":
        _write_video(tmp_path, "other", videos[1].frames)
        return frames, masks, "other"
    if case == "colour_mask":
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(masks / "good" / "frame_1.png")
        return frames, masks, "frame_1.png"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "no_video_folders",
        "empty_folder",
        "too_few_frames",
        "unreadable_image",
        "mask_size_mismatch",
        "missing_mask_file",
        "missing_mask_folder",
        "colour_mask",
    ],
)
def test_frame_folder_errors_name_the_culprit(tmp_path: Path, videos: list[ObjectVideo], case: str) -> None:
    root, masks_dir, culprit = _setup_error(tmp_path, case, videos)
    with pytest.raises(DataError, match=culprit):
        load_frame_folders(root, ep_length=4, image_size=32, masks_dir=masks_dir)


def test_missing_root_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        load_frame_folders(tmp_path / "nowhere", ep_length=4, image_size=32)


# ---------------------------------------------------------------- configs, splits, batches


def test_configs_load_both_kinds(tmp_path: Path, videos: list[ObjectVideo]) -> None:
    synthetic = OmegaConf.load(CONFIGS / "multi_object.yaml")
    assert synthetic.kind == "synthetic" and synthetic.root is None and synthetic.masks_dir is None
    synthetic.num_videos, synthetic.image_size = 3, 32
    loaded = load_object_videos(synthetic)
    assert len(loaded) == 3 and loaded[0].frames.shape == (synthetic.ep_length, 32, 32, 3)

    _write_video(tmp_path, "v", np.concatenate([videos[0].frames, videos[1].frames]))
    folder = OmegaConf.load(CONFIGS / "frame_folder.yaml")
    assert folder.kind == "frame_folder" and OmegaConf.is_missing(folder, "root")
    with pytest.raises(ValueError, match=r"data\.root"):
        load_object_videos(folder)
    folder.root, folder.image_size, folder.ep_length = str(tmp_path / "frames"), 16, 4
    loaded = load_object_videos(folder)
    assert [v.name for v in loaded] == ["v_clip000", "v_clip001", "v_clip002"]
    assert loaded[0].frames.shape == (4, 16, 16, 3) and loaded[0].masks is None

    synthetic.kind = "frame_folder"
    with pytest.raises(ValueError, match=r"data\.root"):
        load_object_videos(synthetic)
    synthetic.kind = "hdf5"
    with pytest.raises(ValueError, match=r"data\.kind"):
        load_object_videos(synthetic)


def _clip(name: str, source: str) -> ObjectVideo:
    return ObjectVideo(name=name, frames=np.zeros((1, 2, 2, 3), np.uint8), masks=None, source=source)


def test_split_videos_keeps_the_clips_of_a_source_together() -> None:
    clips = [_clip(f"s{s}_clip{k}", f"s{s}") for s in range(20) for k in range(3)]
    splits = split_videos(clips, fractions=(0.7, 0.1, 0.2), seed=5)
    assert [len(splits[name]) for name in ("train", "val", "test")] == [14 * 3, 2 * 3, 4 * 3]
    owner = {v.source: name for name, part in splits.items() for v in part}
    assert all(owner[v.source] == name for name, part in splits.items() for v in part)
    assert sorted(v.name for part in splits.values() for v in part) == sorted(v.name for v in clips)
    shuffled = split_videos(clips[::-1], fractions=(0.7, 0.1, 0.2), seed=5)
    assert {k: sorted(v.name for v in p) for k, p in shuffled.items()} == {
        k: sorted(v.name for v in p) for k, p in splits.items()
    }
    other = split_videos(clips, fractions=(0.7, 0.1, 0.2), seed=6)
    assert {v.name for v in other["test"]} != {v.name for v in splits["test"]}
    with pytest.raises(ValueError, match="fractions"):
        split_videos(clips, fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="duplicate"):
        split_videos([*clips, clips[0]])


def test_batch_videos_shapes_and_values(videos: list[ObjectVideo]) -> None:
    frames, masks = batch_videos(videos[:3])
    assert frames.shape == (3, 6, 3, 32, 32) and frames.dtype == torch.float32 and frames.is_contiguous()
    assert masks is not None and masks.shape == (3, 6, 32, 32) and masks.dtype == torch.long
    torch.testing.assert_close(frames[1, 2, 0], torch.from_numpy(videos[1].frames[2, :, :, 0]).float() / 255)
    assert torch.equal(masks[2], torch.from_numpy(videos[2].masks))
    assert frames.min() >= 0.0 and frames.max() <= 1.0

    no_masks = [ObjectVideo(v.name, v.frames, None) for v in videos[:2]]
    assert batch_videos(no_masks)[1] is None
    with pytest.raises(ValueError, match="without masks"):
        batch_videos([videos[0], no_masks[1]])
    with pytest.raises(ValueError, match="differ in shape"):
        batch_videos([videos[0], _clip("x", "x")])


def test_object_video_validates_its_arrays() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ObjectVideo("bad", np.zeros((1, 2, 2, 3), np.float32), None)
    with pytest.raises(ValueError, match="int64"):
        ObjectVideo("bad", np.zeros((1, 2, 2, 3), np.uint8), np.zeros((1, 2, 3), np.int64))
