"""A one-time frame cache: every clip decoded once to a uint8 `.npy` at the training resolution.

Decoding a 480x640 JPEG or an H.264 episode costs milliseconds to seconds per frame read; reading a frame
of a cached clip is a memory copy from the page cache (`np.load(mmap_mode='r')`, the mapping dropped
after each read, so resident memory stays flat). `data.cache=true` builds the cache on first use;
`ablate prepare-data EXPERIMENT [overrides]` builds it ahead of the training job.

Layout: `<cache_dir>/<kind>-<size>px-<options hash>/` (options: everything that changes the pixels:
root, size, crop, camera, image_key, flip, frame_stride) holding `videos/<clip key>.npy` and
`manifest.json`. A clip's key hashes its name and the path, size and mtime of every file it is read
from, so a changed source file gets a new entry; a new resolution gets a new directory.

- atomic: each `.npy` and the manifest are written to a temporary sibling and renamed (core/atomic.py);
- resumable: an interrupted build keeps its finished clips; the next one writes only the missing ones;
- concurrent: builders (e.g. the ranks of one job, two jobs) take an exclusive file lock on the
  directory; the second one waits, then finds the clips written.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from core.atomic import atomic_open, atomic_write_json, file_lock
from core.data.frames import ClipInfo, FrameStore

CACHE_FORMAT = 1
FRAME_OPTIONS = ("kind", "root", "image_size", "crop", "camera", "image_key", "flip", "frame_stride")


def default_cache_dir() -> Path:
    """$ABLATE_DATA_CACHE, else ~/.cache/ablate/frames (set it to node-local or fast shared storage)."""
    return Path(os.environ.get("ABLATE_DATA_CACHE") or Path.home() / ".cache" / "ablate" / "frames")


def cache_directory(data_cfg: DictConfig) -> Path:
    """The directory of this config's cache: one per source root, resolution and pixel-changing option."""
    options = {k: data_cfg.get(k) for k in FRAME_OPTIONS}
    options["root"] = str(Path(str(options["root"])).resolve())
    digest = hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]
    base = Path(data_cfg.get("cache_dir") or default_cache_dir())
    return base / f"{data_cfg.kind}-{data_cfg.image_size}px-{digest}"


def clip_key(store: FrameStore, video: int) -> str:
    """Name + (path, size, mtime) of each source file: changes whenever the clip's sources change."""
    stamp = [store.clips[video].name]
    for path in store.source_files(video):
        st = path.stat()
        stamp.append(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1("\n".join(stamp).encode()).hexdigest()[:20]


class CachedFrames(FrameStore):
    """The clips of a source, read from their cached `.npy` files."""

    def __init__(self, clips: list[ClipInfo], image_size: int, files: Sequence[Path]) -> None:
        self.clips, self.image_size, self.files = clips, image_size, list(files)

    def source_files(self, video: int) -> list[Path]:
        return [self.files[video]]

    def read(self, video: int, times: np.ndarray) -> np.ndarray:
        frames = np.load(self.files[video], mmap_mode="r")  # (T, S, S, 3) uint8, nothing read yet
        return np.array(frames[np.asarray(times)])  # copies the frames; the mapping goes with `frames`


def open_cache(
    store: FrameStore,
    directory: Path,
    options: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CachedFrames:
    """`store`'s clips from the cache in `directory`, after writing every clip not cached yet.

    `progress(done, total)` is called after each clip written (for `ablate prepare-data`)."""
    files = [directory / "videos" / f"{clip_key(store, v)}.npy" for v in range(len(store.clips))]
    missing = [v for v, f in enumerate(files) if not f.exists()]
    if missing or not (directory / "manifest.json").exists():
        directory.mkdir(parents=True, exist_ok=True)
        with file_lock(directory / "build.lock"):  # blocks until another builder is done
            for tmp in (directory / "videos").glob(".*.tmp"):  # left by a killed builder; we hold the lock
                tmp.unlink()
            missing = [v for v in missing if not files[v].exists()]  # another builder may have done them
            for done, v in enumerate(missing, 1):
                frames = store.read(v, np.arange(store.clips[v].num_frames))
                with atomic_open(files[v]) as f:
                    np.save(f, frames)
                if progress is not None:
                    progress(done, len(missing))
            _write_manifest(directory, store, files, options)
    return CachedFrames(store.clips, store.image_size, files)


def _write_manifest(
    directory: Path, store: FrameStore, files: list[Path], options: dict[str, Any] | None
) -> None:
    videos = [
        {"name": c.name, "task": c.task, "frames": c.num_frames, "file": f.relative_to(directory).as_posix()}
        for c, f in zip(store.clips, files, strict=True)
    ]
    manifest = {"format": CACHE_FORMAT, "image_size": store.image_size, "options": options or {}}
    atomic_write_json(directory / "manifest.json", {**manifest, "videos": videos})
