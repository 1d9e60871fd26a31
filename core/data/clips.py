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
The probe label of a pair is the action of its first step, `action_labels[t]`. Frames are read per
batch through `core.data.frames`; `core.data.sources` maps a data config to its source.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from core.data.splits import SPLIT_NAMES, make_splits, select

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
