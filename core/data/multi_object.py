"""Object-centric video data for the slots family: frames plus instance masks, synthetic or read from disk.

Two sources, one record (`ObjectVideo`):
- `make_object_videos`: the embedded default, moving and occluding shapes (squares, circles, triangles)
  with exact instance masks, so VideoARI / FG-ARI / mBO can be measured without any download.
- `load_frame_folders`: real videos as one folder of frames per video, cut into clips of `ep_length`
  frames, with optional instance masks stored the same way as PNG index images.

Masks are `(T, H, W)` int64 label maps: 0 is background, every other value one object. Loaded masks
keep the ids stored in the files (they need not be 1..K); the metrics only compare partitions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from core.data.errors import DataError
from core.data.splits import SPLIT_NAMES, Handle, make_splits

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
DATA_KINDS = ("synthetic", "frame_folder")

# Distinct saturated colours (RGB), all far from the dark textured background; objects of one video
# never share one, so colour alone tells the objects apart.
_PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
    ],
    dtype=np.float32,
)
_CIRCLE, _SQUARE, _TRIANGLE = 0, 1, 2
# Shapes are scaled to the area of a circle of radius s; the circumradius (in units of s) keeps the
# whole shape inside the frame when its centre stays `margin` away from the walls.
_SQUARE_HALF = float(np.sqrt(np.pi) / 2)  # half side of the square of area pi s^2
_TRIANGLE_R = float(np.sqrt(np.pi / (3 * np.sqrt(3) / 4)))  # circumradius of the equilateral one
_CIRCUMRADIUS = np.array([1.0, _SQUARE_HALF * np.sqrt(2), _TRIANGLE_R])
_SIZE_RANGE = (0.09, 0.19)  # s as a fraction of the image side
_SPEED_RANGE = (0.03, 0.07)  # pixels per frame as a fraction of the image side
_COLOUR_JITTER = 15.0  # per-object colour offset, so a colour is not one exact RGB value
_BACKGROUND_RANGE = (35.0, 85.0)  # per-video background grey level
_TEXTURE_AMPLITUDE = 8.0  # two static sine gratings
_NOISE_STD = 3.0  # per-pixel, per-frame sensor noise


@dataclass(frozen=True)
class ObjectVideo:
    """One clip: RGB frames and, when known, instance masks aligned with them.

    `source` names the recording the clip was cut from (its folder; the clip's own name for synthetic
    videos): splits keep all clips of one source together so no recording leaks between train and test.
    """

    name: str
    frames: np.ndarray  # (T, H, W, 3) uint8
    masks: np.ndarray | None  # (T, H, W) int64, 0 = background
    source: str | None = None

    def __post_init__(self) -> None:
        if self.frames.ndim != 4 or self.frames.shape[-1] != 3 or self.frames.dtype != np.uint8:
            raise ValueError(
                f"video {self.name!r}: frames must be (T, H, W, 3) uint8, "
                f"got {self.frames.shape} {self.frames.dtype}"
            )
        if self.masks is not None and (
            self.masks.shape != self.frames.shape[:3] or self.masks.dtype != np.int64
        ):
            raise ValueError(
                f"video {self.name!r}: masks must be {self.frames.shape[:3]} int64, "
                f"got {self.masks.shape} {self.masks.dtype}"
            )
        if self.source is None:
            object.__setattr__(self, "source", self.name)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


# ---------------------------------------------------------------- synthetic moving shapes


def make_object_videos(
    num_videos: int = 64, frames: int = 8, image_size: int = 64, max_objects: int = 4, seed: int = 0
) -> list[ObjectVideo]:
    """`num_videos` videos (`objects_{i:04d}`) of 2..`max_objects` shapes moving over a textured background.

    Each shape (circle, square or triangle; distinct colour and size within a video) moves with constant
    velocity and bounces off the walls, staying whole inside the frame; shapes occlude each other by a
    fixed random depth order, and the mask shows the visible (front) object at each pixel. Video i is
    drawn from its own generator seeded by (seed, i), so it does not change when `num_videos` does.
    """
    if num_videos < 0 or frames < 1:
        raise ValueError(f"need num_videos >= 0 and frames >= 1, got {num_videos} and {frames}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 (shapes need a few pixels), got {image_size}")
    if not 1 <= max_objects <= len(_PALETTE):
        raise ValueError(f"max_objects must be in [1, {len(_PALETTE)}] (distinct colours), got {max_objects}")
    return [
        _make_object_video(
            np.random.default_rng([seed, i]), f"objects_{i:04d}", frames, image_size, max_objects
        )
        for i in range(num_videos)
    ]


def _make_object_video(rng: np.random.Generator, name: str, T: int, S: int, max_objects: int) -> ObjectVideo:
    K = int(rng.integers(min(2, max_objects), max_objects + 1))
    shape = rng.integers(0, 3, size=K)  # (K,)
    sizes = np.linspace(*_SIZE_RANGE, max(6, max_objects)) * S
    s = rng.choice(sizes, size=K, replace=False)  # (K,)
    margin = s * _CIRCUMRADIUS[shape]  # (K,)
    start = rng.uniform(margin[:, None], S - margin[:, None], size=(K, 2))  # (K, 2) x, y
    angle = rng.uniform(0, 2 * np.pi, size=K)
    speed = rng.uniform(*_SPEED_RANGE, size=K) * S
    velocity = speed[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)  # (K, 2)
    depth = rng.permutation(K)  # larger = nearer the camera
    colours = _PALETTE[rng.choice(len(_PALETTE), size=K, replace=False)]
    colours = colours + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, size=(K, 3))  # (K, 3)

    centre = _bounce(start, velocity, margin, S, T)  # (K, T, 2)
    masks = _render_masks(centre, s, shape, depth, S)  # (T, S, S)
    background = _background(rng, S)  # (S, S, 3)
    noise = rng.standard_normal((T, S, S, 3), dtype=np.float32) * _NOISE_STD
    palette = np.concatenate([np.zeros((1, 3), np.float32), colours.astype(np.float32)])  # (K + 1, 3)
    image = np.where((masks > 0)[..., None], palette[masks], background) + noise  # (T, S, S, 3)
    frames = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return ObjectVideo(name=name, frames=frames, masks=masks)


def _bounce(start: np.ndarray, velocity: np.ndarray, margin: np.ndarray, S: int, T: int) -> np.ndarray:
    """Centres (K, T, 2) under constant velocity, reflected at [margin, S - margin] (a triangle wave)."""
    lo = margin[:, None, None]  # (K, 1, 1)
    span = np.maximum(S - 2 * lo, 1e-6)
    travel = start[:, None, :] - lo + velocity[:, None, :] * np.arange(T)[None, :, None]  # (K, T, 2)
    phase = np.mod(travel, 2 * span)
    return lo + span - np.abs(phase - span)


def _render_masks(
    centre: np.ndarray, s: np.ndarray, shape: np.ndarray, depth: np.ndarray, S: int
) -> np.ndarray:
    """Label maps (T, S, S): at each pixel the nearest covering object (1..K), else 0; all frames at once."""
    pix = np.arange(S, dtype=np.float64) + 0.5  # pixel centres
    dx = pix[None, None, None, :] - centre[:, :, 0, None, None]  # (K, T, 1, S)
    dy = pix[None, None, :, None] - centre[:, :, 1, None, None]  # (K, T, S, 1)
    r = s[:, None, None, None]
    circle = dx**2 + dy**2 <= r**2
    square = np.maximum(np.abs(dx), np.abs(dy)) <= _SQUARE_HALF * r
    tri_r = _TRIANGLE_R * r  # apex up (image y grows downwards), base at tri_r / 2 below the centre
    triangle = (dy <= tri_r / 2) & (np.abs(dx) <= (dy + tri_r) / np.sqrt(3))
    kind = shape[:, None, None, None]
    cover = np.where(kind == _CIRCLE, circle, np.where(kind == _SQUARE, square, triangle))  # (K, T, S, S)
    score = cover * (depth[:, None, None, None] + 1)  # 0 where uncovered, else depth rank + 1
    front = score.argmax(axis=0)  # (T, S, S)
    return np.where(score.max(axis=0) > 0, front + 1, 0).astype(np.int64)


def _background(rng: np.random.Generator, S: int) -> np.ndarray:
    """A dim grey level plus two faint static sine gratings (S, S, 3): texture the model must ignore."""
    level = rng.uniform(*_BACKGROUND_RANGE) + rng.uniform(-5, 5, size=3)  # (3,) slightly tinted
    freq = rng.uniform(1, 4, size=(2, 2))  # cycles per image along (x, y) for each grating
    phase = rng.uniform(0, 2 * np.pi, size=2)
    pix = (np.arange(S) + 0.5) / S
    texture = sum(
        np.sin(2 * np.pi * (freq[g, 0] * pix[None, :] + freq[g, 1] * pix[:, None]) + phase[g])
        for g in range(2)
    )  # (S, S)
    return (level[None, None, :] + _TEXTURE_AMPLITUDE / 2 * texture[..., None]).astype(np.float32)


# ---------------------------------------------------------------- frame folders on disk


def load_frame_folders(
    root: str | Path, ep_length: int, image_size: int, masks_dir: str | Path | None = None
) -> list[ObjectVideo]:
    """Clips of `ep_length` consecutive frames from `root/<video>/<frame>.{png,jpg,...}`.

    Videos and frames are ordered naturally (`frame_2` before `frame_10`); each video is cut into
    non-overlapping clips (`<video>_clip{k:03d}`), a remainder shorter than `ep_length` is dropped.
    Frames are resized so the shorter side is `image_size`, then center-cropped to a square. With
    `masks_dir`, `masks_dir/<video>/<frame stem>.png` is the index image for each frame (same size as
    the frame; resized with nearest neighbour, cropped the same way). Hidden and non-image files are
    ignored; everything else that is wrong raises `DataError` naming the folder or file.
    """
    if ep_length < 1 or image_size < 1:
        raise ValueError(f"ep_length and image_size must be >= 1, got {ep_length} and {image_size}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: frame folder root is not a directory")
    folders = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_natural_key
    )
    if not folders:
        raise DataError(f"{root}: no video folders (expected one sub-folder of frames per video)")
    mask_root = None if masks_dir is None else Path(masks_dir)
    if mask_root is not None and not mask_root.is_dir():
        raise DataError(f"{mask_root}: masks_dir is not a directory")

    videos: list[ObjectVideo] = []
    for folder in folders:
        files = sorted(
            (
                p
                for p in folder.iterdir()
                if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
            ),
            key=_natural_key,
        )
        if not files:
            raise DataError(f"{folder}: no frames (expected image files {sorted(IMAGE_SUFFIXES)})")
        if len(files) < ep_length:
            raise DataError(f"{folder}: {len(files)} frames, fewer than ep_length={ep_length}")
        n_clips = len(files) // ep_length
        files = files[: n_clips * ep_length]
        mask_folder = None if mask_root is None else mask_root / folder.name
        if mask_folder is not None and not mask_folder.is_dir():
            raise DataError(f"{mask_folder}: mask folder missing for video folder {folder}")
        frame_list, mask_list = [], []
        for file in files:
            frame = _open(file)
            if mask_folder is not None:
                mask_list.append(_read_mask(mask_folder / f"{file.stem}.png", frame.size, image_size))
            frame_list.append(_fit(frame.convert("RGB"), image_size, Image.Resampling.BILINEAR))
        frames = np.stack(frame_list)  # (N, S, S, 3) uint8
        masks = np.stack(mask_list) if mask_list else None  # (N, S, S) int64
        for k in range(n_clips):
            clip = slice(k * ep_length, (k + 1) * ep_length)
            videos.append(
                ObjectVideo(
                    name=f"{folder.name}_clip{k:03d}",
                    frames=frames[clip],
                    masks=None if masks is None else masks[clip],
                    source=folder.name,
                )
            )
    return videos


def _natural_key(path: Path) -> list[int | str]:
    """`frame_2` < `frame_10`: digit runs compare as numbers (they sit at odd positions of the split)."""
    return [int(part) if i % 2 else part.lower() for i, part in enumerate(re.split(r"(\d+)", path.name))]


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: unreadable image ({err})") from None


def _read_mask(path: Path, frame_size: tuple[int, int], image_size: int) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: mask missing (one PNG per frame, named like the frame)")
    mask = _open(path)
    if mask.mode not in ("P", "L", "I", "I;16", "1"):
        raise DataError(f"{path}: mask must be a single-channel index image, got mode {mask.mode}")
    if mask.size != frame_size:
        raise DataError(f"{path}: mask size {mask.size} differs from its frame's size {frame_size}")
    # nearest neighbour keeps palette indices as they are (no mapping through the palette)
    return _fit(mask, image_size, Image.Resampling.NEAREST).astype(np.int64)


def _fit(image: Image.Image, size: int, resample: Image.Resampling) -> np.ndarray:
    """Resize the shorter side to `size`, center-crop a square: the same box for a frame and its mask."""
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.resize((nw, nh), resample).crop((left, top, left + size, top + size))
    return np.asarray(image)


# ---------------------------------------------------------------- config, splits, batches


def load_object_videos(data_cfg: Mapping[str, Any]) -> list[ObjectVideo]:
    """The dataset named by a `data` config (experiments/data/multi_object.yaml or frame_folder.yaml)."""
    kind = data_cfg["kind"]
    if kind == "synthetic":
        return make_object_videos(
            num_videos=data_cfg["num_videos"],
            frames=data_cfg["ep_length"],
            image_size=data_cfg["image_size"],
            max_objects=data_cfg["max_objects"],
            seed=data_cfg["seed"],
        )
    if kind == "frame_folder":
        if data_cfg.get("root") is None:
            raise ValueError("data.root must name the folder of video folders when data.kind=frame_folder")
        return load_frame_folders(
            data_cfg["root"], data_cfg["ep_length"], data_cfg["image_size"], data_cfg.get("masks_dir")
        )
    raise ValueError(f"data.kind must be one of {list(DATA_KINDS)}, got {kind!r}")


def split_videos(
    videos: Sequence[ObjectVideo], fractions: tuple[float, float, float] = (0.75, 0.10, 0.15), seed: int = 42
) -> dict[str, list[ObjectVideo]]:
    """Train/val/test clips, split by source recording with `core.data.splits.make_splits`' rules.

    Splitting sources rather than clips keeps every clip of one recording in one split; the result does
    not depend on the input order, and within a split clips keep their input order.
    """
    names = [v.name for v in videos]
    if len(set(names)) != len(names):
        raise ValueError("split_videos: duplicate video names")
    sources = [Handle(name=s, task="objects") for s in dict.fromkeys(v.source for v in videos)]
    splits = make_splits(sources, fractions=tuple(fractions), seed=seed)
    where = {source: split for split in SPLIT_NAMES for source in splits[split].get("objects", [])}
    return {split: [v for v in videos if where[v.source] == split] for split in SPLIT_NAMES}


def batch_videos(videos: Sequence[ObjectVideo]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack clips of one shape into model input: frames (B, T, 3, H, W) float in [0, 1], masks (B, T, H, W).

    Masks are None when no clip has them; a batch mixing clips with and without masks is an error.
    """
    if not videos:
        raise ValueError("batch_videos: no videos")
    shapes = {v.frames.shape for v in videos}
    if len(shapes) != 1:
        raise ValueError(f"batch_videos: clips differ in shape {sorted(shapes)}")
    frames = torch.from_numpy(np.stack([v.frames for v in videos]))  # (B, T, H, W, 3) uint8
    frames = frames.permute(0, 1, 4, 2, 3).to(torch.float32, memory_format=torch.contiguous_format) / 255.0
    with_masks = [v.masks is not None for v in videos]
    if not any(with_masks):
        return frames, None
    if not all(with_masks):
        missing = [v.name for v in videos if v.masks is None]
        raise ValueError(f"batch_videos: clips without masks in a batch with masks: {missing[:3]}")
    masks = torch.from_numpy(np.stack([v.masks for v in videos]))  # (B, T, H, W) int64
    return frames, masks
