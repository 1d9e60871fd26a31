"""The video family's streaming input pipeline: frames read per batch from the source files by DataLoader
workers, exactly the pairs drawn before the epoch, each rank its share, and memory that does not grow
with the dataset."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from core.data.clips import VideoClip, sample_pairs
from core.data.frames import MemoryFrames, read_pairs
from core.data.layouts import write_bridge, write_libero
from core.data.loader import PairBatches, default_num_workers, pair_loader
from core.data.sources import load_clips, open_frames
from tests.helpers import assert_same_final_weights

REPO = Path(__file__).resolve().parents[1]


def _data_cfg(kind: str, root: Path, size: int):
    return OmegaConf.merge(
        OmegaConf.load(REPO / "experiments" / "data" / f"{kind}.yaml"),
        {"root": str(root), "image_size": size},
    )


@pytest.mark.parametrize("kind", ["bridge", "libero"])
def test_streamed_frames_equal_the_fully_loaded_clip(tmp_path: Path, kind: str) -> None:
    """A store reads any subset of a clip's frames exactly as loading the whole clip does."""
    if kind == "bridge":
        root = write_bridge(tmp_path / "bridge", 3, 9, height=48, width=64)
    else:
        root = write_libero(tmp_path / "libero" / "task.hdf5", 3, 9, size=32).parent
    cfg = _data_cfg(kind, root, 24)
    store, clips = open_frames(cfg), load_clips(cfg)
    assert [c.name for c in store.clips] == [c.name for c in clips]
    times = np.array([1, 4, 8])
    for v, clip in enumerate(clips):
        assert np.array_equal(store.read(v, times), clip.frames[times])
        assert np.array_equal(store.clips[v].action_labels, clip.action_labels)


def _clips(lengths: list[int], size: int = 8) -> list[VideoClip]:
    rng = np.random.default_rng(0)
    return [
        VideoClip(
            f"c{i}",
            rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8),
            np.zeros((n - 1, 3), np.float32),
            np.zeros(n - 1, np.int64),
        )
        for i, n in enumerate(lengths)
    ]


def test_loader_workers_and_ranks_read_exactly_the_drawn_batches() -> None:
    clips = _clips([5, 9, 12, 7])
    store = MemoryFrames(clips)
    sample = sample_pairs(
        [c.num_frames for c in clips], 48, k_max=4, generator=torch.Generator().manual_seed(0)
    )
    want_t, want_tk = read_pairs(store, range(4), sample)
    batches = PairBatches(store, range(4), sample, batch_size=16)
    for workers in (0, 2):
        got = list(pair_loader(batches, num_workers=workers))
        assert len(got) == 3
        assert np.array_equal(torch.cat([b.img_t for b in got]).permute(0, 2, 3, 1).numpy(), want_t)
        assert np.array_equal(torch.cat([b.img_tk for b in got]).permute(0, 2, 3, 1).numpy(), want_tk)
        assert torch.equal(torch.cat([b.k for b in got]), sample.k)
    # a resumed epoch starts at batch 2 without reading batches 0 and 1
    (last,) = pair_loader(batches, start=2, num_workers=1)
    assert torch.equal(last.img_t, got[2].img_t)
    # two ranks: each reads its half of every global batch, together exactly the global batch
    shards = [
        list(pair_loader(PairBatches(store, range(4), sample, 16, r, 2), num_workers=0)) for r in (0, 1)
    ]
    for i, whole in enumerate(got):
        assert torch.equal(torch.cat([shards[0][i].img_t, shards[1][i].img_t]), whole.img_t)
        assert shards[0][i].img_t.shape[0] == 8
    with pytest.raises(ValueError, match="not divisible by 3 ranks"):
        PairBatches(store, range(4), sample, 16, 0, 3)


def test_default_num_workers_is_the_tasks_cpus_minus_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "9")
    assert default_num_workers() == 8
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert default_num_workers() == 0
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert default_num_workers() == max(len(os.sched_getaffinity(0)) - 1, 0)


def _probe(mode: str, root: Path, out: Path) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, "-m", "tests.memory_probe", mode, str(root), str(out), str(SIZE)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _rows(run_dir: Path) -> list[dict]:
    rows = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]


SIZE = 128  # training resolution of the memory test: 48 KiB per decoded frame
CAP_MB = 64  # resident memory a run may add over the same run on a tiny dataset


@pytest.mark.slow
def test_training_on_bridge_data_larger_than_the_memory_cap_stays_under_it_and_resumes_exactly(tmp_path):
    """200 trajectories x 24 frames: 225 MiB of decoded frames, 3.5x the cap. Streaming trains an epoch,
    is stopped mid-epoch and resumed, within the cap over a 12-trajectory run (peak RSS of the training
    process and of its DataLoader worker); the previous whole-in-memory pipeline exceeds it on loading
    alone. The resumed run ends with the uninterrupted run's metrics and weights."""
    small = write_bridge(tmp_path / "small", 12, 24, height=SIZE, width=SIZE, seed=1)
    big = write_bridge(tmp_path / "big", 200, 24, height=SIZE, width=SIZE)
    decoded_mb = 200 * 24 * SIZE * SIZE * 3 / 2**20
    assert decoded_mb > 3 * CAP_MB
    base = _probe("stream", small, tmp_path / "o_small")
    cap = {k: v + CAP_MB for k, v in base.items()}
    streamed = _probe("stream", big, tmp_path / "o_big")
    assert streamed["self_mb"] < cap["self_mb"] and streamed["children_mb"] < cap["children_mb"], (
        streamed,
        cap,
    )
    whole = _probe("whole", big, tmp_path / "o_whole")
    assert whole["self_mb"] > cap["self_mb"], (whole, cap)  # the cap really rules out loading it all
    full, cut = tmp_path / "o_big" / "full", tmp_path / "o_big" / "cut"
    assert _rows(cut) == _rows(full)
    assert (
        json.loads((cut / "summary.json").read_text())["eval"]
        == json.loads((full / "summary.json").read_text())["eval"]
    )
    assert_same_final_weights(full, cut)


# ---------------------------------------------------------------- frame cache


def test_frame_cache_equals_the_source_resumes_and_follows_source_and_size_changes(tmp_path: Path) -> None:
    from core.data.cache import CachedFrames
    from core.data.sources import prepare_cache

    root = write_bridge(tmp_path / "bridge", 3, 6, height=48, width=64)
    cfg = OmegaConf.merge(
        _data_cfg("bridge", root, 24), {"cache": True, "cache_dir": str(tmp_path / "cache")}
    )
    source, cached = open_frames(_data_cfg("bridge", root, 24)), open_frames(cfg)
    assert isinstance(cached, CachedFrames)
    times = np.array([0, 2, 5])
    for v in range(3):
        assert np.array_equal(cached.read(v, times), source.read(v, times))
    manifest = json.loads((cached.files[0].parents[1] / "manifest.json").read_text())
    assert [v["name"] for v in manifest["videos"]] == [c.name for c in source.clips]

    def writes() -> list[int]:
        done: list[int] = []
        prepare_cache(cfg, lambda i, n: done.append(n))
        return done

    assert writes() == []  # complete: nothing to do
    # an interrupted build: one clip never written, a torn temporary left behind -> only that clip
    cached.files[1].unlink()
    (cached.files[1].parent / f".{cached.files[1].name}.x.tmp").write_bytes(b"torn")
    assert writes() == [1]
    assert not list(cached.files[1].parent.glob(".*.tmp"))
    # a changed source frame: that clip gets a new entry with the new pixels
    frame = root.glob("**/traj1/images0/im_2.jpg").__next__()
    from PIL import Image

    Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(frame, quality=92)
    assert writes() == [1]
    refreshed = open_frames(cfg)
    assert refreshed.files[1] != cached.files[1] and refreshed.files[0] == cached.files[0]
    assert np.array_equal(refreshed.read(1, times), open_frames(_data_cfg("bridge", root, 24)).read(1, times))
    # another resolution: another directory
    other = open_frames(OmegaConf.merge(cfg, {"image_size": 16}))
    assert other.files[0].parents[1] != cached.files[0].parents[1] and other.read(0, times).shape[1] == 16


def test_two_prepare_data_commands_at_once_write_each_clip_once(tmp_path: Path) -> None:
    """`ablate prepare-data` twice concurrently (two jobs, or the ranks of one): the directory lock lets
    one write while the other waits, then finds every clip done."""
    root = write_bridge(tmp_path / "bridge", 6, 8, height=120, width=160)
    cmd = [sys.executable, "-m", "launchers.cli", "prepare-data", "video_two_stream", "data=bridge"]
    cmd += [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.image_size=64"]
    procs = [
        subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    dirs = {out.strip() for out, _ in outs}
    assert len(dirs) == 1
    written = [int(m) for _, err in outs for m in re.findall(r"(\d+)/\d+ clips written", err)[-1:]]
    assert sorted(written) == [6], outs  # one builder wrote all 6, the other none
    assert len(list(Path(dirs.pop(), "videos").glob("*.npy"))) == 6


def test_prepare_data_rejects_a_generated_source(capsys: pytest.CaptureFixture[str]) -> None:
    from launchers.cli import main

    assert main(["prepare-data", "video_two_stream"]) == 2
    assert "generated in memory" in capsys.readouterr().err
