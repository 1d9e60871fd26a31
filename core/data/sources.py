"""The video family's data sources: which config `kind` reads which source, and the checks of a clip config.

The registry lives here, apart from `core.data.clips` (pairs, resizing) and the sources themselves, so
that sources import clips and frames, and nothing imports back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from core.data.clips import CROP_MODES, VideoClip
from core.data.frames import FrameStore, MemoryFrames

CLIP_KINDS = ("moving_objects", "atari", "bridge", "egodex", "libero")
DISK_KINDS = ("bridge", "egodex", "libero")


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
    if not isinstance(data_cfg.get("cache", False), bool):
        raise ValueError(f"data.cache must be true or false, got {data_cfg.get('cache')!r}")
    if kind in DISK_KINDS:
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


def open_frames(data_cfg: DictConfig) -> FrameStore:
    """The clip index and frame reader named by a `data` config group (experiments/data/<kind>.yaml).

    Sources are imported on use, so the synthetic default never needs ale-py, h5py or av. The embedded
    sources are generated whole (small); the on-disk ones read frames when a batch needs them, from the
    source files or, with `data.cache=true`, from the frame cache (built here on first use)."""
    check_data_config(data_cfg)
    kind, size = data_cfg.kind, data_cfg.image_size
    crop = data_cfg.get("crop", "center")
    if kind == "moving_objects":
        from core.data.moving_objects import make_moving_objects

        return MemoryFrames(make_moving_objects(image_size=size, **_kwargs(data_cfg.get("generator"))))
    if kind == "atari":
        from core.data.atari import make_atari_clips

        gen = _kwargs(data_cfg.get("generator"))
        return MemoryFrames(make_atari_clips(image_size=size, crop=crop, **gen))

    store = _disk_source(data_cfg)
    if data_cfg.get("cache", False):
        from core.data.cache import cache_directory, open_cache

        return open_cache(store, cache_directory(data_cfg), _options(data_cfg))
    return store


def prepare_cache(data_cfg: DictConfig, progress: Callable[[int, int], None] | None = None) -> Path:
    """Build (or complete) the frame cache of an on-disk source; returns its directory."""
    check_data_config(data_cfg)
    if data_cfg.kind not in DISK_KINDS:
        raise ValueError(f"data.kind={data_cfg.kind!r} is generated in memory: it has no frame cache")
    from core.data.cache import cache_directory, open_cache

    directory = cache_directory(data_cfg)
    open_cache(_disk_source(data_cfg), directory, _options(data_cfg), progress)
    return directory


def _options(data_cfg: DictConfig) -> dict[str, Any]:
    return {k: v for k, v in _kwargs(data_cfg).items() if not isinstance(v, dict | list)}


def _disk_source(data_cfg: DictConfig) -> FrameStore:
    """The source that reads the files of a Bridge / EgoDex / LIBERO layout."""
    from core.data import robot_video

    kind, size = data_cfg.kind, data_cfg.image_size
    crop = data_cfg.get("crop", "center")
    common: dict[str, Any] = {"image_size": size, "crop": crop, "max_videos": data_cfg.get("max_videos")}
    common["still_threshold"] = data_cfg.still_threshold
    if kind == "bridge":
        return robot_video.BridgeFrames(data_cfg.root, camera=data_cfg.get("camera", "images0"), **common)
    if kind == "egodex":
        parts = data_cfg.get("parts")
        return robot_video.EgoDexFrames(
            data_cfg.root,
            parts=None if parts is None else list(parts),
            joint=data_cfg.joint,
            reference=data_cfg.reference,
            frame_stride=data_cfg.get("frame_stride", 1),
            **common,
        )
    return robot_video.LiberoFrames(
        data_cfg.root, image_key=data_cfg.image_key, flip=data_cfg.get("flip", "vertical"), **common
    )


def load_clips(data_cfg: DictConfig) -> list[VideoClip]:
    """Every clip of the source with all its frames in memory (small data, tests)."""
    store = open_frames(data_cfg)
    return [store.clip(v) for v in range(len(store.clips))]


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
