"""Write datasets in the real on-disk layouts of Bridge V2, EgoDex and LIBERO (see `core.data.robot_video`).

For the input-pipeline benchmark and the bounded-memory test: the files are what the loaders read in the
wild (JPEG folders + pickles, H.264 mp4 + HDF5 poses, HDF5 demos), with frames of realistic size and
texture (a textured scene with a moving object and sensor noise compresses like a camera frame, not
like a flat synthetic image). Deterministic from `seed`.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def scene_frames(rng: np.random.Generator, count: int, height: int, width: int) -> np.ndarray:
    """(count, height, width, 3) uint8: a fixed textured background, a block moving across it, noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 17 + y / 23)], -1) * 160 + 40
    texture = rng.normal(0, 12, size=(height // 8 + 1, width // 8 + 1, 3)).astype(np.float32)
    base += np.kron(texture, np.ones((8, 8, 1), np.float32))[:height, :width]
    side = max(height // 5, 2)
    start, velocity = rng.uniform(0, [height - side, width - side]), rng.normal(0, 0.01, 2) * [height, width]
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    for t in range(count):
        img = base + rng.normal(0, 4, size=(height, width, 1)).astype(np.float32)
        top, left = (np.abs(start + t * velocity) % [height - side, width - side]).astype(int)
        img[top : top + side, left : left + side] = (220, 60, 40)
        frames[t] = img.clip(0, 255).astype(np.uint8)
    return frames


def write_bridge(
    root: Path,
    trajectories: int,
    frames: int,
    *,
    height: int = 480,
    width: int = 640,
    quality: int = 92,
    seed: int = 0,
) -> Path:
    """`trajectories` raw trajectories of `frames` JPEG frames, 7-D actions and an instruction each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(trajectories):
        raw = root / "toykitchen1" / f"task{i % 4}" / "00" / "2023-03-15_14-35-28" / "raw"
        traj = raw / f"traj_group{i // 100}" / f"traj{i}"
        (traj / "images0").mkdir(parents=True)
        for t, frame in enumerate(scene_frames(rng, frames, height, width)):
            Image.fromarray(frame).save(traj / "images0" / f"im_{t}.jpg", quality=quality)
        actions = rng.normal(0, 0.01, size=(frames - 1, 7)).astype(np.float32)
        (traj / "policy_out.pkl").write_bytes(pickle.dumps([{"actions": a} for a in actions]))
        (traj / "lang.txt").write_text(f"move the block {i % 4}\nconfidence: 1\n")
    return root


def write_libero(path: Path, demos: int, frames: int, *, size: int = 128, seed: int = 0) -> Path:
    """One LIBERO task file: `demos` demos of `frames` (size x size) agentview frames, stored upside down."""
    import h5py

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for i in range(demos):
            obs = scene_frames(rng, frames, size, size)[:, ::-1]
            f.create_dataset(f"data/demo_{i}/obs/agentview_rgb", data=obs, chunks=(1, size, size, 3))
            f.create_dataset(f"data/demo_{i}/actions", data=rng.uniform(-1, 1, size=(frames, 7)))
    return path


def write_egodex(
    root: Path, episodes: int, frames: int, *, height: int = 1080, width: int = 1920, seed: int = 0
) -> Path:
    """`episodes` EgoDex episodes `<root>/part1/<task>/<i>.mp4 + .hdf5`: H.264 at 30 Hz, hand and camera
    poses for every frame."""
    import av
    import h5py

    rng = np.random.default_rng(seed)
    for i in range(episodes):
        stem = root / "part1" / f"task{i % 2}" / str(i)
        stem.parent.mkdir(parents=True, exist_ok=True)
        with av.open(str(stem.with_suffix(".mp4")), "w") as container:
            stream = container.add_stream("libx264", rate=30)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"preset": "veryfast", "crf": "23"}
            for frame in scene_frames(rng, frames, height, width):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        poses = np.tile(np.eye(4), (frames, 1, 1))
        hand = poses.copy()
        hand[:, :3, 3] = np.cumsum(rng.normal(0, 0.005, size=(frames, 3)), axis=0)
        with h5py.File(stem.with_suffix(".hdf5"), "w") as f:
            f.create_dataset("transforms/rightHand", data=hand)
            f.create_dataset("transforms/camera", data=poses)
    return root
