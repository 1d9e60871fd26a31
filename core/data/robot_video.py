"""Loaders for the real robot / egocentric video layouts of the two-stream note (two-stream.md).

- Bridge V2 raw: `<root>/.../raw/traj_group*/traj*/` with `images0/im_{t}.jpg` (T frames),
  `policy_out.pkl` (T-1 entries, dicts with 'actions' (7,) or bare arrays; action i leads from frame i
  to i+1, as in the release's own numpy conversion) and an optional `lang.txt` (first line = the
  instruction). Task = the folder three levels above `raw` (`<task>/<NN>/<timestamp>/raw`) when it
  lies under root, else 'bridge'. The release's 2-step latency shift for data before 2021-07-23 is
  not applied.
- EgoDex: `<root>/<part>/<task>/<i>.mp4` + `<i>.hdf5`, decoded with PyAV. The HDF5 holds
  `transforms/<joint>` (N, 4, 4) poses in the world frame and `transforms/camera` (N, 4, 4)
  camera-to-world. Actions are the per-step translation of `joint`; with `reference='camera'` the
  joint's position is first expressed in each frame's camera coordinates (ARKit: x right, y up,
  z towards the viewer), so the action is the motion seen in the image, head motion included.
- LIBERO: one HDF5 per task, `data/demo_<i>/obs/<image_key>` (T, H, W, 3) uint8 stored upside down,
  `data/demo_<i>/actions` (T, 7); action t leads from frame t to t+1, the last one is dropped.
  `flip='vertical'` turns the frames upright ('rotate180' matches pipelines that also mirror them).

Labels (all three sources): the dominant translation direction of the step's action, in the source's
own axes - 0 '+x', 1 '-x', 2 '+y', 3 '-y', 4 '+z', 5 '-z' (axis of the largest |component|, then its
sign) - or 6 'still' when every |component| <= still_threshold (per source: Bridge metres per step,
LIBERO normalised [-1, 1] commands, EgoDex metres per sampled frame).

Every malformed input raises `DataError` naming the file and the problem.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.data.clips import resize_frames
from core.data.errors import DataError
from core.data.frames import ClipInfo, FrameStore

DIRECTION_NAMES = ("+x", "-x", "+y", "-y", "+z", "-z", "still")
STILL = DIRECTION_NAMES.index("still")
FLIPS = ("vertical", "rotate180", "none")
REFERENCES = ("camera", "world")
_FRAME = re.compile(r"im_(\d+)\.jpg")
_DEMO = re.compile(r"demo_(\d+)")


def direction_labels(translation: np.ndarray, still_threshold: float) -> np.ndarray:
    """(N, 3) per-step translations -> (N,) int64 labels of DIRECTION_NAMES (see the module docstring)."""
    magnitude = np.abs(translation)  # (N, 3)
    axis = np.argmax(magnitude, axis=1)  # (N,)
    rows = np.arange(len(translation))
    labels = 2 * axis + (translation[rows, axis] < 0)
    return np.where(magnitude[rows, axis] <= still_threshold, STILL, labels).astype(np.int64)


# ---------------------------------------------------------------- Bridge V2 raw


class BridgeFrames(FrameStore):
    """Every trajectory under `root` (sorted by path; the first `max_videos` when given), frames decoded
    from their JPEGs when read. Indexing lists each camera folder and reads each policy_out.pkl."""

    def __init__(
        self,
        root: str | Path,
        *,
        image_size: int,
        crop: str = "center",
        camera: str = "images0",
        still_threshold: float = 0.005,
        max_videos: int | None = None,
    ) -> None:
        root = _existing(root)
        trajectories = sorted(p for p in root.glob("**/raw/traj_group*/traj*") if p.is_dir())
        if not trajectories:
            raise DataError(f"{root}: no Bridge trajectories (expected <root>/.../raw/traj_group*/traj*/)")
        self.image_size, self.crop = image_size, crop
        self.clips, self._folders = [], []
        for traj in trajectories[:max_videos]:
            folder = traj / camera
            actions = _read_policy_out(traj / "policy_out.pkl", _count_jpgs(folder))  # (T-1, A)
            lang = traj / "lang.txt"
            lines = lang.read_text(errors="replace").strip().splitlines() if lang.is_file() else []
            relative = traj.relative_to(root)
            # <task>/<NN>/<stamp>/raw/group/traj
            task_dir = traj.parents[4] if len(relative.parts) >= 6 else None
            self._folders.append(folder)
            self.clips.append(
                ClipInfo(
                    name=relative.as_posix(),
                    actions=actions,
                    action_labels=direction_labels(actions[:, :3], still_threshold),
                    task=task_dir.relative_to(root).as_posix() if task_dir is not None else "bridge",
                    instruction=lines[0].strip() if lines else "",
                )
            )

    def source_files(self, video: int) -> list[Path]:
        folder = self._folders[video]
        return [*sorted(folder.glob("im_*.jpg")), folder.parent / "policy_out.pkl"]

    def read(self, video: int, times: np.ndarray) -> np.ndarray:
        """JPEG draft mode decodes a big frame at a reduced scale that keeps both sides >= image_size."""
        from PIL import Image

        folder, images = self._folders[video], []
        for t in times:
            path = folder / f"im_{t}.jpg"
            try:
                with Image.open(path) as image:
                    image.draft("RGB", (self.image_size, self.image_size))
                    images.append(np.asarray(image.convert("RGB")))
            except OSError as err:
                raise DataError(f"{path}: unreadable image ({err})") from None
        shapes = {a.shape for a in images}
        if len(shapes) != 1:
            raise DataError(f"{folder}: frames differ in size {sorted(shapes)}")
        return resize_frames(np.stack(images), self.image_size, self.crop)


def _count_jpgs(folder: Path) -> int:
    """T of a camera folder holding exactly im_0.jpg .. im_{T-1}.jpg, T >= 2."""
    if not folder.is_dir():
        raise DataError(f"{folder}: missing camera folder (expected {folder.name}/im_<t>.jpg)")
    index = {int(m.group(1)) for p in folder.iterdir() if (m := _FRAME.fullmatch(p.name))}
    if len(index) < 2:
        raise DataError(f"{folder}: needs at least 2 frames im_<t>.jpg, found {len(index)}")
    missing = sorted(set(range(len(index))) - index)
    if missing:
        raise DataError(
            f"{folder}: frames must be im_0.jpg..im_{len(index) - 1}.jpg; im_{missing[0]}.jpg is missing"
        )
    return len(index)


def _read_policy_out(path: Path, num_frames: int) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: missing (the trajectory's actions)")
    try:
        with path.open("rb") as f:
            entries = pickle.load(f, encoding="latin1")  # latin1: the release has Python 2 pickles
    except Exception as err:  # a corrupt pickle raises almost anything
        raise DataError(f"{path}: unreadable pickle ({type(err).__name__}: {err})") from None
    if not isinstance(entries, list | tuple):
        raise DataError(f"{path}: expected a list of per-step entries, got {type(entries).__name__}")
    try:
        rows = [e["actions"] if isinstance(e, dict) else e for e in entries]
        actions = np.asarray(rows, dtype=np.float32)
    except (KeyError, ValueError, TypeError) as err:
        raise DataError(
            f"{path}: entries must be dicts with 'actions' of one length, or arrays ({err!r})"
        ) from None
    if actions.ndim != 2 or actions.shape[1] < 3:
        raise DataError(f"{path}: actions must be (steps, >= 3), got shape {actions.shape}")
    if actions.shape[0] != num_frames - 1:
        raise DataError(
            f"{path}: {actions.shape[0]} actions for {num_frames} frames "
            f"(expected {num_frames - 1}, one per step)"
        )
    _check_finite(path, actions)
    return actions


# ---------------------------------------------------------------- EgoDex


class EgoDexFrames(FrameStore):
    """Every `<part>/<task>/<i>.hdf5` + `.mp4` pair under `root` (parts: all, or the listed ones).

    actions (T-1, 3) = translation of `joint` between consecutive sampled frames (every
    `frame_stride`-th of the 30 Hz video), in metres, in the camera or world frame. Indexing reads only
    the HDF5 poses; `read` decodes the episode's whole mp4 (H.264 has no cheap random access), so a
    training run on EgoDex pays one episode decode per pair.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        image_size: int,
        crop: str = "center",
        parts: Sequence[str] | None = None,
        joint: str = "rightHand",
        reference: str = "camera",
        frame_stride: int = 1,
        still_threshold: float = 0.002,
        max_videos: int | None = None,
    ) -> None:
        if reference not in REFERENCES:
            raise ValueError(f"egodex reference must be one of {list(REFERENCES)}, got {reference!r}")
        if not (isinstance(frame_stride, int) and frame_stride >= 1):
            raise ValueError(f"egodex frame_stride must be an integer >= 1, got {frame_stride!r}")
        root = _existing(root)
        if parts is not None:
            absent = [p for p in parts if not (root / p).is_dir()]
            if absent:
                raise DataError(
                    f"{root}: parts {absent} not found "
                    f"(have {sorted(p.name for p in root.iterdir() if p.is_dir())})"
                )
        wanted = None if parts is None else set(parts)
        files = sorted(
            p for p in root.glob("*/*/*") if p.suffix in (".hdf5", ".mp4") and _in_parts(p, root, wanted)
        )
        stems = sorted({p.with_suffix("") for p in files})
        if not stems:
            raise DataError(f"{root}: no EgoDex episodes (expected <root>/<part>/<task>/<i>.mp4 + <i>.hdf5)")
        self.image_size, self.crop, self.frame_stride = image_size, crop, frame_stride
        self.clips, self._videos, self._num_poses = [], [], []
        for stem in stems[:max_videos]:
            video, poses = stem.with_suffix(".mp4"), stem.with_suffix(".hdf5")
            for path in (video, poses):
                if not path.is_file():
                    raise DataError(f"{path}: missing (each EgoDex episode needs <i>.mp4 and <i>.hdf5)")
            position, instruction = _egodex_positions(poses, joint, reference)  # (N, 3)
            self._num_poses.append(position.shape[0])
            position = position[::frame_stride]
            if position.shape[0] < 2:
                raise DataError(f"{video}: fewer than 2 frames at frame_stride={frame_stride}")
            actions = np.diff(position, axis=0).astype(np.float32)  # (T-1, 3)
            part, task, index = stem.relative_to(root).parts
            self._videos.append(video)
            self.clips.append(
                ClipInfo(
                    name=f"{part}/{task}/{index}",
                    actions=actions,
                    action_labels=direction_labels(actions, still_threshold),
                    task=task,
                    instruction=instruction,
                )
            )

    def source_files(self, video: int) -> list[Path]:
        return [self._videos[video], self._videos[video].with_suffix(".hdf5")]

    def read(self, video: int, times: np.ndarray) -> np.ndarray:
        path = self._videos[video]
        frames = _decode_mp4(path, self.image_size, self.crop)  # (N, S, S, 3)
        if frames.shape[0] != self._num_poses[video]:
            poses = self._num_poses[video]
            raise DataError(f"{path}: {frames.shape[0]} video frames but {poses} poses in {path.stem}.hdf5")
        return frames[:: self.frame_stride][times]


def _in_parts(path: Path, root: Path, parts: set[str] | None) -> bool:
    return parts is None or path.relative_to(root).parts[0] in parts


def _egodex_positions(path: Path, joint: str, reference: str) -> tuple[np.ndarray, str]:
    """((N, 3) float64 joint positions in the reference frame, the episode's description)."""
    h5py = _h5py()
    with _open_hdf5(h5py, path) as f:
        pose = _dataset(f, path, f"transforms/{joint}", trailing=(4, 4))  # (N, 4, 4)
        position = pose[:, :3, 3]  # (N, 3) world
        if reference == "camera":
            cam = _dataset(f, path, "transforms/camera", trailing=(4, 4))  # (N, 4, 4) camera-to-world
            if cam.shape[0] != pose.shape[0]:
                raise DataError(
                    f"{path}: transforms/camera has {cam.shape[0]} poses, transforms/{joint} {pose.shape[0]}"
                )
            # p_cam = R^T (p_world - c), batched over frames
            position = np.einsum("nji,nj->ni", cam[:, :3, :3], position - cam[:, :3, 3])
        description = next((f.attrs[k] for k in ("llm_description", "description") if k in f.attrs), "")
    if isinstance(description, bytes):
        description = description.decode(errors="replace")
    return position, str(description)


def _decode_mp4(path: Path, image_size: int, crop: str) -> np.ndarray:
    """Every frame of the first video stream, scaled by FFmpeg (area filter) so that the crop is exact."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            width, height = stream.codec_context.width, stream.codec_context.height
            if crop == "squash":
                size = (image_size, image_size)
            else:  # short side to image_size; resize_frames cuts the centred square
                scale = image_size / min(width, height)
                size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
            frames = [
                frame.to_ndarray(format="rgb24", width=size[0], height=size[1], interpolation="AREA")
                for frame in container.decode(stream)
            ]
    except DataError:
        raise
    except (av.FFmpegError, OSError, ValueError) as err:
        raise DataError(f"{path}: cannot decode video ({type(err).__name__}: {err})") from None
    if len(frames) < 2:
        raise DataError(f"{path}: decoded {len(frames)} frames, need at least 2")
    return resize_frames(np.stack(frames), image_size, crop)


# ---------------------------------------------------------------- LIBERO


class LiberoFrames(FrameStore):
    """Every demo of `root` (one .hdf5 file, or every .hdf5 below a folder), task = file stem. Indexing
    reads actions and image shapes; `read` reads only the requested frames (HDF5 random access), from
    files opened lazily in the reading process (an h5py handle must not cross a fork)."""

    def __init__(
        self,
        root: str | Path,
        *,
        image_size: int,
        crop: str = "center",
        image_key: str = "agentview_rgb",
        flip: str = "vertical",
        still_threshold: float = 0.1,
        max_videos: int | None = None,
    ) -> None:
        if flip not in FLIPS:
            raise ValueError(f"libero flip must be one of {list(FLIPS)}, got {flip!r}")
        root = _existing(root)
        files = [root] if root.is_file() else sorted(root.glob("**/*.hdf5"))
        if not files:
            raise DataError(f"{root}: no LIBERO .hdf5 files")
        self.image_size, self.crop, self.flip, self.image_key = image_size, crop, flip, image_key
        self.clips, self._demos = [], []
        self._open: tuple[int, dict[Path, Any]] | None = None  # (pid, path -> open file)
        h5py = _h5py()
        for path in files:
            with _open_hdf5(h5py, path) as f:
                if "data" not in f:
                    raise DataError(f"{path}: missing group 'data' (expected data/demo_<i>/...)")
                demos = sorted((int(m.group(1)), k) for k in f["data"] if (m := _DEMO.fullmatch(k)))
                if not demos:
                    raise DataError(f"{path}: no data/demo_<i> groups")
                instruction = _libero_instruction(f["data"].attrs)
                for _, demo in demos:
                    if max_videos is not None and len(self.clips) >= max_videos:
                        return
                    actions = _libero_demo(f, path, demo, image_key)  # (T, A)
                    steps = actions[:-1]  # (T-1, A): the last action leads out of the recording
                    self._demos.append((path, demo))
                    self.clips.append(
                        ClipInfo(
                            name=f"{path.stem}/{demo}",
                            actions=steps,
                            action_labels=direction_labels(steps[:, :3], still_threshold),
                            task=path.stem,
                            instruction=instruction,
                        )
                    )

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": None}  # workers open their own handles

    def source_files(self, video: int) -> list[Path]:
        return [self._demos[video][0]]

    def read(self, video: int, times: np.ndarray) -> np.ndarray:
        path, demo = self._demos[video]
        if self._open is None or self._open[0] != os.getpid():
            self._open = (os.getpid(), {})
        files = self._open[1]
        if path not in files:
            files[path] = _open_hdf5(_h5py(), path)
        frames = files[path][f"data/{demo}/obs/{self.image_key}"][np.asarray(times)]  # (n, H, W, 3)
        if self.flip == "vertical":
            frames = frames[:, ::-1]
        elif self.flip == "rotate180":
            frames = frames[:, ::-1, ::-1]
        return resize_frames(frames, self.image_size, self.crop)


def _libero_demo(f: Any, path: Path, demo: str, image_key: str) -> np.ndarray:
    """One demo's actions (T, A) float32, checked together with the shape of its frames (not read)."""
    key = f"data/{demo}/obs/{image_key}"
    frames = _dataset(f, path, key, trailing=None, read=False)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise DataError(f"{path}: {key} must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if frames.shape[0] < 2:
        raise DataError(f"{path}: {key} has {frames.shape[0]} frames, need at least 2")
    actions = _dataset(f, path, f"data/{demo}/actions", trailing=None).astype(np.float32)
    if actions.ndim != 2 or actions.shape[0] != frames.shape[0] or actions.shape[1] < 3:
        raise DataError(
            f"{path}: data/{demo}/actions has shape {actions.shape}, expected ({frames.shape[0]}, >= 3)"
        )
    _check_finite(path, actions)
    return actions


def _libero_instruction(attrs: Any) -> str:
    """LIBERO keeps the language goal in data.attrs['problem_info'] (JSON); absent -> ''."""
    try:
        return str(json.loads(attrs["problem_info"]).get("language_instruction", ""))
    except (KeyError, TypeError, ValueError, AttributeError):
        return ""


# ---------------------------------------------------------------- shared


def _existing(root: str | Path | None) -> Path:
    if root is None:
        raise DataError("data.root is null: set data.root to the dataset folder")
    path = Path(root)
    if not path.exists():
        raise DataError(f"{path}: data.root does not exist")
    return path


def _h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise DataError("reading HDF5 needs h5py: pip install 'h5py==3.16.0'") from None
    return h5py


def _open_hdf5(h5py: Any, path: Path) -> Any:
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{path}: unreadable HDF5 ({err})") from None


def _dataset(f: Any, path: Path, key: str, trailing: tuple[int, ...] | None, read: bool = True) -> Any:
    """The dataset `key` of HDF5 file `f`, read into memory (or the h5py handle when not `read`)."""
    if key not in f:
        parent = key.rsplit("/", 1)[0]
        have = sorted(f[parent]) if parent in f else []
        raise DataError(f"{path}: missing dataset {key!r} (have {have[:12]} under {parent!r})")
    data = f[key][()] if read else f[key]
    if trailing is not None and (data.ndim != 1 + len(trailing) or data.shape[1:] != trailing):
        raise DataError(f"{path}: {key} must be (N, {', '.join(map(str, trailing))}), got {data.shape}")
    return data


def _check_finite(path: Path, actions: np.ndarray) -> None:
    if not np.isfinite(actions).all():
        row = int(np.argwhere(~np.isfinite(actions))[0, 0])
        raise DataError(f"{path}: non-finite action at step {row}")
