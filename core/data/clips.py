"""Video clips with a known action per step, and the (img_t, img_t+k) pairs the video family trains on.

Every source (the synthetic pushing world, Atari frames from ale-py, Bridge V2 / EgoDex / LIBERO on
disk) yields `VideoClip`s resized to one square size, so the model and the linear probe never see a
source-specific layout. Pairs are drawn as in the original two-stream predictor (multi-gap sampling,
see ../reference/two-stream.md):

- a video with probability proportional to its number of steps T - 1 (every frame that can start a
  pair is equally likely, as when a dataset enumerates frames);
- a gap k in 1..min(k_max, T - 1) with p(k) ~ exp(-gap_decay (k - 1)), truncated per video;
- a start t uniform over the valid starts 0..T-1-k;
- a loss weight exp(-weight_decay (k - 1)).
The probe label of a pair is the action of its first step, `action_labels[t]`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from core.data.splits import SPLIT_NAMES, make_splits, select

CLIP_KINDS = ("moving_objects", "atari", "bridge", "egodex", "libero")
CROP_MODES = ("center", "squash")
_RESIZE_CHUNK = 16  # frames resized at once: bounds the float copy of large (e.g. 480x640) frames


@dataclass
class VideoClip:
    """One video with the action taken between each pair of consecutive frames.

    `actions[i]` and `action_labels[i]` describe the step from `frames[i]` to `frames[i + 1]`.
    `task` groups clips for a stratified split (game, EgoDex task, LIBERO file); `instruction` is the
    language annotation where the source has one.
    """

    name: str
    frames: np.ndarray  # (T, H, W, 3) uint8
    actions: np.ndarray  # (T-1, A) float32
    action_labels: np.ndarray  # (T-1,) int64
    task: str = ""
    instruction: str = ""

    def __post_init__(self) -> None:
        f, a, y = self.frames, self.actions, self.action_labels
        if f.ndim != 4 or f.shape[-1] != 3 or f.dtype != np.uint8:
            raise ValueError(
                f"clip {self.name!r}: frames must be (T, H, W, 3) uint8, got {f.shape} {f.dtype}"
            )
        steps = f.shape[0] - 1
        if a.ndim != 2 or a.shape[0] != steps or a.dtype != np.float32:
            raise ValueError(
                f"clip {self.name!r}: actions must be ({steps}, A) float32, got {a.shape} {a.dtype}"
            )
        if y.shape != (steps,) or y.dtype != np.int64:
            raise ValueError(
                f"clip {self.name!r}: action_labels must be ({steps},) int64, got {y.shape} {y.dtype}"
            )

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


class PairSample(NamedTuple):
    """N frame pairs (video[i], frame t[i]) -> (video[i], frame t[i] + k[i]) with their loss weights."""

    video: torch.Tensor  # (N,) int64 index into the clip list
    t: torch.Tensor  # (N,) int64 first frame
    k: torch.Tensor  # (N,) int64 gap, 1 <= k, t + k < T
    weight: torch.Tensor  # (N,) float32 exp(-weight_decay (k - 1))


@dataclass(frozen=True)
class FrameBank:
    """All clips' frames and labels concatenated once, so a batch is gathered by one fancy index.

    Build it once per split (`FrameBank.from_clips(train_clips)`) and pass it to `gather_pairs` and
    `pair_labels` in place of the clip list; the list form groups by video instead of copying.
    """

    frames: np.ndarray  # (sum T, H, W, 3) uint8
    labels: np.ndarray  # (sum (T - 1),) int64
    frame_offsets: np.ndarray  # (V,) int64 index of each clip's first frame
    label_offsets: np.ndarray  # (V,) int64 index of each clip's first step
    lengths: np.ndarray  # (V,) int64 frames per clip

    @classmethod
    def from_clips(cls, clips: Sequence[VideoClip]) -> FrameBank:
        _check_same_size(clips)
        lengths = np.array([c.num_frames for c in clips], dtype=np.int64)
        frame_offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        label_offsets = np.concatenate([[0], np.cumsum(lengths - 1)[:-1]]).astype(np.int64)
        return cls(
            frames=np.concatenate([c.frames for c in clips]),
            labels=np.concatenate([c.action_labels for c in clips]),
            frame_offsets=frame_offsets,
            label_offsets=label_offsets,
            lengths=lengths,
        )


# ---------------------------------------------------------------- pairs


def sample_pairs(
    lengths: Sequence[int],
    n: int,
    k_max: int,
    gap_decay: float = 0.3,
    weight_decay: float = 0.7,
    generator: torch.Generator | None = None,
) -> PairSample:
    """Draw `n` pairs from videos of `lengths` frames (the module docstring gives the distribution).

    Vectorised: the per-video truncated gap distributions form one (V, k_max) CDF table that every
    sample inverts at once. Videos with fewer than 2 frames are never drawn.
    """
    if not (isinstance(k_max, int) and k_max >= 1):
        raise ValueError(f"k_max must be an integer >= 1, got {k_max!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if gap_decay < 0 or weight_decay < 0:
        raise ValueError(f"gap_decay and weight_decay must be >= 0, got {gap_decay}, {weight_decay}")
    lengths_t = torch.as_tensor(list(lengths), dtype=torch.int64)  # (V,)
    steps = (lengths_t - 1).clamp(min=0)  # (V,) frames that can start a pair
    if lengths_t.numel() == 0 or int(steps.sum()) == 0:
        raise ValueError(f"no video has 2 or more frames (lengths {list(lengths)[:10]})")
    if n == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return PairSample(empty, empty, empty, torch.zeros(0))

    video = torch.multinomial(steps.double(), n, replacement=True, generator=generator)  # (N,)
    k_cap = steps.clamp(max=k_max)  # (V,) largest gap per video
    gaps = torch.arange(1, k_max + 1, dtype=torch.float64)  # (K,)
    mass = torch.exp(-gap_decay * (gaps - 1)) * (gaps <= k_cap[:, None])  # (V, K), zero past the cap
    cdf = mass.cumsum(1)
    cdf = cdf / cdf[:, -1:].clamp(min=1e-300)  # (V, K); rows of unused videos are never read
    u = torch.rand(n, 1, dtype=torch.float64, generator=generator)  # (N, 1)
    k = torch.searchsorted(cdf[video], u, right=True).squeeze(1) + 1  # (N,) first cdf > u
    k = torch.minimum(k, k_cap[video])  # guards u within rounding of 1
    starts = lengths_t[video] - k  # (N,) number of valid starts
    t = torch.floor(torch.rand(n, dtype=torch.float64, generator=generator) * starts).long()
    t = torch.minimum(t, starts - 1)
    weight = torch.exp(-weight_decay * (k - 1).double()).float()
    return PairSample(video=video, t=t, k=k, weight=weight)


def pair_labels(clips: Sequence[VideoClip] | FrameBank, sample: PairSample) -> torch.Tensor:
    """(N,) int64 probe labels: the action of each pair's first step, `action_labels[video][t]`."""
    video, t = sample.video.numpy(), sample.t.numpy()
    if isinstance(clips, FrameBank):
        return torch.from_numpy(clips.labels[clips.label_offsets[video] + t])
    out = np.empty(len(video), dtype=np.int64)
    for v, idx in _group_by_video(video):
        out[idx] = clips[v].action_labels[t[idx]]
    return torch.from_numpy(out)


def gather_pairs(
    clips: Sequence[VideoClip] | FrameBank, sample: PairSample
) -> tuple[torch.Tensor, torch.Tensor]:
    """(img_t, img_tk), each (N, 3, H, W) float32 in [0, 1], for the pairs of `sample`.

    A `FrameBank` is one fancy index over the concatenated frames; a clip list is gathered per
    distinct video in the sample (a loop over at most N videos, each a vectorised index).
    """
    video, t = sample.video.numpy(), sample.t.numpy()
    times = np.concatenate([t, t + sample.k.numpy()])  # (2N,) first frames, then second frames
    videos = np.concatenate([video, video])
    if isinstance(clips, FrameBank):
        frames = clips.frames[clips.frame_offsets[videos] + times]  # (2N, H, W, 3) uint8
    else:
        h, w = _check_same_size(clips)
        frames = np.empty((len(times), h, w, 3), dtype=np.uint8)
        for v, idx in _group_by_video(videos):
            frames[idx] = clips[v].frames[times[idx]]
    images = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255.0)  # (2N, 3, H, W)
    n = len(t)
    return images[:n].contiguous(), images[n:].contiguous()


def _group_by_video(video: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(video, positions in `video` holding it) for each distinct video."""
    order = np.argsort(video, kind="stable")
    distinct, first = np.unique(video[order], return_index=True)
    yield from zip(distinct.tolist(), np.split(order, first[1:]), strict=True)


def _check_same_size(clips: Sequence[VideoClip]) -> tuple[int, int]:
    if not clips:
        raise ValueError("no clips")
    sizes = {c.frames.shape[1:3] for c in clips}
    if len(sizes) != 1:
        raise ValueError(f"clips have different frame sizes {sorted(sizes)}; load them with one image_size")
    (h, w), *_ = sizes
    return int(h), int(w)


# ---------------------------------------------------------------- splits


def split_clips(
    clips: Sequence[VideoClip], fractions: Sequence[float] = (0.75, 0.10, 0.15), seed: int = 42
) -> dict[str, list[VideoClip]]:
    """Train/val/test clips by video, stratified by `task`, through `core.data.splits.make_splits`.

    The split depends only on (task, name) handles and the seed, never on clip order, so it can be
    saved with `save_splits(make_splits(clips, ...), path)` and re-selected with `select`.
    """
    # make_splits and select read only `.task` and `.name`, which clips share with `Video`
    splits = make_splits(clips, fractions=tuple(fractions), seed=seed)
    return {name: select(clips, splits, name) for name in SPLIT_NAMES}


# ---------------------------------------------------------------- frames


def resize_frames(frames: np.ndarray, size: int, crop: str = "center") -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, size, size, 3) uint8 by antialiased bilinear resizing.

    `crop='center'` first cuts the largest centred square (no distortion, loses the borders of the
    long side); `crop='squash'` stretches the whole frame (keeps e.g. an Atari paddle at the edge).
    """
    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {list(CROP_MODES)}, got {crop!r}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got {frames.shape}")
    _, h, w, _ = frames.shape
    if crop == "center":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        frames = frames[:, top : top + side, left : left + side]
    if frames.shape[1:3] == (size, size):
        return np.ascontiguousarray(frames)
    out = np.empty((frames.shape[0], size, size, 3), dtype=np.uint8)
    for start in range(0, frames.shape[0], _RESIZE_CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(frames[start : start + _RESIZE_CHUNK]))
        x = chunk.permute(0, 3, 1, 2).float()  # (t, 3, H, W)
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + _RESIZE_CHUNK] = (
            y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        )
    return out


# ---------------------------------------------------------------- config


def check_data_config(data_cfg: DictConfig) -> None:
    """Reject a clip data config before anything loads; ValueError names the key."""
    kind = data_cfg.get("kind")
    if kind not in CLIP_KINDS:
        raise ValueError(f"data.kind must be one of {list(CLIP_KINDS)}, got {kind!r}")
    size = data_cfg.get("image_size")
    if not (isinstance(size, int) and size >= 8):
        raise ValueError(f"data.image_size must be an integer >= 8, got {size!r}")
    if data_cfg.get("crop", "center") not in CROP_MODES:
        raise ValueError(f"data.crop must be one of {list(CROP_MODES)}, got {data_cfg.get('crop')!r}")
    max_videos = data_cfg.get("max_videos")
    if max_videos is not None and not (isinstance(max_videos, int) and max_videos >= 1):
        raise ValueError(f"data.max_videos must be null or an integer >= 1, got {max_videos!r}")
    if kind in ("bridge", "egodex", "libero"):
        root = data_cfg.get("root")
        if root is None:
            raise ValueError(
                f"data.root is null: set data.root=/path/to/{kind} (see experiments/data/{kind}.yaml)"
            )
        if not Path(str(root)).exists():
            raise ValueError(f"data.root={root!r} does not exist")
    pairs = data_cfg.get("pairs")
    if pairs is not None:
        unknown = set(pairs) - {"k_max", "gap_decay", "weight_decay"}
        if unknown:
            raise ValueError(
                f"data.pairs: unknown keys {sorted(unknown)}; have k_max, gap_decay, weight_decay"
            )
        k_max = pairs.get("k_max")
        if not (isinstance(k_max, int) and k_max >= 1):
            raise ValueError(f"data.pairs.k_max must be an integer >= 1, got {k_max!r}")
        for key in ("gap_decay", "weight_decay"):
            value = pairs.get(key, 0.0)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"data.pairs.{key} must be a number >= 0, got {value!r}")


def load_clips(data_cfg: DictConfig) -> list[VideoClip]:
    """The clips named by a `data` config group (experiments/data/<kind>.yaml), resized to image_size.

    Sources are imported on use, so the synthetic default never needs ale-py, h5py or av.
    """
    check_data_config(data_cfg)
    kind, size = data_cfg.kind, data_cfg.image_size
    crop = data_cfg.get("crop", "center")
    max_videos = data_cfg.get("max_videos")
    if kind == "moving_objects":
        from core.data.moving_objects import make_moving_objects

        return make_moving_objects(image_size=size, **_kwargs(data_cfg.get("generator")))
    if kind == "atari":
        from core.data.atari import make_atari_clips

        return make_atari_clips(image_size=size, crop=crop, **_kwargs(data_cfg.get("generator")))

    from core.data import robot_video

    common: dict[str, Any] = {"image_size": size, "crop": crop, "max_videos": max_videos}
    common["still_threshold"] = data_cfg.still_threshold
    if kind == "bridge":
        return robot_video.load_bridge(data_cfg.root, camera=data_cfg.get("camera", "images0"), **common)
    if kind == "egodex":
        parts = data_cfg.get("parts")
        return robot_video.load_egodex(
            data_cfg.root,
            parts=None if parts is None else list(parts),
            joint=data_cfg.joint,
            reference=data_cfg.reference,
            frame_stride=data_cfg.get("frame_stride", 1),
            **common,
        )
    return robot_video.load_libero(
        data_cfg.root, image_key=data_cfg.image_key, flip=data_cfg.get("flip", "vertical"), **common
    )


def num_action_classes(data_cfg: DictConfig) -> int:
    """How many probe labels the source defines (some may be absent from a given split)."""
    check_data_config(data_cfg)
    if data_cfg.kind == "moving_objects":
        from core.data.moving_objects import num_classes

        gen = _kwargs(data_cfg.get("generator"))
        return num_classes(**{k: gen[k] for k in ("directions", "speeds") if k in gen})
    if data_cfg.kind == "atari":
        from core.data.atari import action_names

        return len(action_names(_kwargs(data_cfg.get("generator")).get("game", "breakout")))
    from core.data.robot_video import DIRECTION_NAMES

    return len(DIRECTION_NAMES)


def _kwargs(node: Any) -> dict[str, Any]:
    if node is None:
        return {}
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
