"""Frames read when a batch needs them: the clip index of a source and the one interface that reads it.

A `FrameStore` holds only the small per-clip facts (`ClipInfo`: name, task, actions, labels, length);
`read(video, times)` decodes the requested frames from the source files at the training size. Training
memory therefore does not grow with the dataset, and the reads run in DataLoader worker processes
(`core.data.loader`). Embedded sources (synthetic pushing world, Atari) are generated whole and kept
in a `MemoryFrames`; the on-disk layouts have their own stores in `core.data.robot_video`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.data.clips import PairSample, VideoClip


@dataclass(frozen=True)
class ClipInfo:
    """Everything about a clip but its frames: `actions[i]` / `action_labels[i]` lead from frame i to i+1."""

    name: str
    actions: np.ndarray  # (T-1, A) float32
    action_labels: np.ndarray  # (T-1,) int64
    task: str = ""
    instruction: str = ""

    @property
    def num_frames(self) -> int:
        return len(self.action_labels) + 1

    @classmethod
    def of(cls, clip: VideoClip) -> ClipInfo:
        return cls(clip.name, clip.actions, clip.action_labels, clip.task, clip.instruction)


class FrameStore(ABC):
    """The clips of one source and a reader of their frames (picklable: DataLoader workers get a copy).

    Subclasses set `clips` and `image_size` and implement `read`; a reader that holds open files opens
    them lazily in the process that reads, never in the parent of the workers."""

    clips: list[ClipInfo]
    image_size: int

    @abstractmethod
    def read(self, video: int, times: np.ndarray) -> np.ndarray:
        """(len(times), S, S, 3) uint8 frames `times` (sorted, distinct) of clip `video`, S = image_size."""

    def source_files(self, video: int) -> list[Path]:
        """The files clip `video` is read from: their sizes and times fingerprint it in a frame cache
        (`core.data.cache`). Default: none (generated in memory, nothing to cache)."""
        return []

    def clip(self, video: int) -> VideoClip:
        """The whole clip in memory (tests, small data)."""
        info = self.clips[video]
        frames = self.read(video, np.arange(info.num_frames))
        return VideoClip(info.name, frames, info.actions, info.action_labels, info.task, info.instruction)


class MemoryFrames(FrameStore):
    """Clips already in memory: the embedded, generated sources."""

    def __init__(self, clips: Sequence[VideoClip]) -> None:
        sizes = {c.frames.shape[1:3] for c in clips}
        if len(sizes) != 1 or len({*next(iter(sizes))}) != 1:
            raise ValueError(f"clips must share one square frame size, got {sorted(sizes)}")
        self._frames = [c.frames for c in clips]
        self.clips = [ClipInfo.of(c) for c in clips]
        self.image_size = int(next(iter(sizes))[0])

    def read(self, video: int, times: np.ndarray) -> np.ndarray:
        return self._frames[video][times]


def read_pairs(store: FrameStore, videos: Sequence[int], sample: PairSample) -> tuple[np.ndarray, np.ndarray]:
    """(img_t, img_tk), each (N, S, S, 3) uint8, of the pairs of `sample`; `sample.video[i]` indexes
    `videos` (a split's clip indices into the store). Each distinct frame of a clip is read once."""
    video, t = sample.video.numpy(), sample.t.numpy()
    times = np.concatenate([t, t + sample.k.numpy()])  # (2N,) first frames, then second frames
    clip = np.asarray(videos, dtype=np.int64)[np.concatenate([video, video])]  # (2N,)
    s = store.image_size
    frames = np.empty((len(times), s, s, 3), dtype=np.uint8)
    for v, idx in _group(clip):
        wanted, where = np.unique(times[idx], return_inverse=True)
        frames[idx] = store.read(v, wanted)[where]
    n = len(t)
    return frames[:n], frames[n:]


def pair_labels(clips: Sequence[ClipInfo], sample: PairSample) -> torch.Tensor:
    """(N,) int64 probe labels: the action of each pair's first step, `action_labels[video][t]`."""
    video, t = sample.video.numpy(), sample.t.numpy()
    out = np.empty(len(video), dtype=np.int64)
    for v, idx in _group(video):
        out[idx] = clips[v].action_labels[t[idx]]
    return torch.from_numpy(out)


def _group(video: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(value, positions in `video` holding it) for each distinct value."""
    order = np.argsort(video, kind="stable")
    distinct, first = np.unique(video[order], return_index=True)
    yield from zip(distinct.tolist(), np.split(order, first[1:]), strict=True)
