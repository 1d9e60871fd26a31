"""Run in a subprocess by test_video_streaming: train (or load) a Bridge-layout dataset, print peak RSS.

    python -m tests.memory_probe stream|whole ROOT OUT IMAGE_SIZE

`stream`: the pipeline as shipped - an uninterrupted run in OUT/full, then a run stopped after its 2nd
training batch in OUT/cut and resumed there. `whole`: the previous pipeline's footprint - every clip's
frames in memory, concatenated into one bank. Prints {"self_mb", "children_mb"}: the peak resident set of
this process (VmHWM) and of its largest child (DataLoader workers, getrusage).
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import numpy as np


def peak_rss_mb() -> float:
    """Peak resident set of this process image (VmHWM). Not getrusage's ru_maxrss: Linux carries it over
    exec from the image this process was forked from, so under pytest it would start at pytest's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def overrides(root: str, size: int) -> list[str]:
    return [
        "logger.enabled=false",
        "data=bridge",
        f"data.root={root}",
        f"data.image_size={size}",
        f"model.image_size={size}",
        "model.patch_size=16",
        "model.width=32",
        "model.decoder.dim=32",
        "model.decoder.skip_channels=8",
        "data.pairs_per_epoch=64",
        "data.batch_size=16",
        "data.pairs.k_max=4",
        "eval.pairs=32",
        "eval.probe_pairs=32",
        "eval.probe_max_iter=20",
        "eval.plot_examples=0",
        "trainer.epochs=1",
        "trainer.num_threads=1",
        "loader.num_workers=1",
    ]


def main(mode: str, root: str, out: str, size: int) -> None:
    from launchers.config import compose_experiment

    cfg = compose_experiment("video_two_stream", overrides(root, size))
    if mode == "whole":
        from core.data.sources import load_clips

        clips = load_clips(cfg.data)
        bank = np.concatenate([c.frames for c in clips])
        assert bank.nbytes > 0
    else:
        from core.train.loop import Interrupted
        from core.train.run import build_task, run_experiment
        from core.train.signals import request_stop, stop_on_signals

        run_experiment(cfg, Path(out) / "full")
        task = build_task(cfg, Path(out) / "cut")
        real, seen = task.losses, []

        def losses(batch, epoch, generator):  # a stop request (preemption) during the 2nd training batch
            if task.model.training:
                seen.append(epoch)
                if len(seen) == 2:
                    request_stop("test")
            return real(batch, epoch, generator)

        task.losses = losses
        try:
            with stop_on_signals():
                run_experiment(cfg, Path(out) / "cut", task=task)
        except Interrupted:
            pass
        run_experiment(cfg, Path(out) / "cut")
    peak = {
        "self_mb": peak_rss_mb(),
        "children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    print(json.dumps(peak))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
