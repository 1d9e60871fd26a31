"""Input-pipeline throughput of the video family at 224 px, per source layout, against the GPU's demand.

Run with `python -m benchmarks.bench_video_data`. For each on-disk layout the benchmark first writes a
dataset with realistic frames (`core.data.layouts`: Bridge V2 480x640 JPEG at quality 92, LIBERO 128x128
HDF5 demos, EgoDex 1920x1080 H.264 mp4 + HDF5 poses), then times what training does: pairs drawn by
`sample_pairs` (k_max 10), read and resized to 224 px in batches of 64 by `loader.num_workers` DataLoader
worker processes, with 1, 2 and all of this machine's CPUs as workers; first from the source files, then
from the frame cache (`data.cache=true`, built by `ablate prepare-data`, whose rate is printed too).
Files are read warm from the page cache (a cluster's network file system adds its own latency, which
more workers hide).

The GPU demand: training FLOPs per pair of the 224 px model (forward + backward, counted by torch's
FlopCounterMode on the meta device) at an assumed model FLOPs utilisation of an H100 (bf16 dense peak
989 TFLOP/s) - the rate `bench_video` measures when a GPU is lent. Cores per GPU = demand / pairs/s per core.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from benchmarks.bench_video import H100_BF16_PEAK, training_flops_per_pair
from core.data.clips import sample_pairs
from core.data.layouts import write_bridge, write_egodex, write_libero
from core.data.loader import PairBatches, pair_loader
from core.data.sources import open_frames, prepare_cache

DATA_CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "data"


LAYOUTS = ("bridge", "libero", "egodex")


def write_layouts(root: Path, scale: int, kinds: tuple[str, ...] = LAYOUTS) -> dict[str, Path]:
    """One dataset per layout under `root`; `scale` multiplies the number of videos."""
    writers = {
        "bridge": lambda: write_bridge(root / "bridge", 4 * scale, 38),  # Bridge V2: ~38 frames a trajectory
        "libero": lambda: write_libero(root / "libero" / "task.hdf5", 4 * scale, 120).parent,
        "egodex": lambda: write_egodex(root / "egodex", scale, 90),  # 3 s episodes (real ones: minutes)
    }
    return {kind: writers[kind]() for kind in kinds}


def data_config(kind: str, root: Path, cache_dir: Path | None) -> DictConfig:
    cfg = OmegaConf.load(DATA_CONFIGS / f"{kind}.yaml")
    cache = {"cache": True, "cache_dir": str(cache_dir)} if cache_dir else {}
    return OmegaConf.merge(cfg, {"root": str(root), "image_size": 224, **cache})


def pairs_per_second(cfg: DictConfig, workers: int, pairs: int, batch: int) -> float:
    store = open_frames(cfg)
    lengths = [c.num_frames for c in store.clips]
    sample = sample_pairs(lengths, pairs + batch, k_max=10, generator=torch.Generator().manual_seed(0))
    batches = PairBatches(store, range(len(lengths)), sample, batch)
    loader = pair_loader(batches, num_workers=workers, prefetch_factor=2)
    next(loader)  # workers started, first batch read: not timed
    start = time.perf_counter()
    n = sum(len(item.k) for item in loader)
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=512, help="timed pairs per setting")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--scale", type=int, default=2, help="videos written per layout (x4 Bridge/LIBERO)")
    parser.add_argument("--mfu", type=float, default=0.40, help="assumed model FLOPs utilisation of the GPU")
    parser.add_argument("--gpu-pairs-per-s", type=float, default=None, help="measured GPU rate, if known")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cpus = len(os.sched_getaffinity(0))
    flops = training_flops_per_pair()
    demand = args.gpu_pairs_per_s or args.mfu * H100_BF16_PEAK / flops
    source = (
        "given"
        if args.gpu_pairs_per_s
        else f"H100 bf16 {H100_BF16_PEAK / 1e12:.0f} TFLOP/s x MFU {args.mfu:.0%}"
    )
    print(
        f"224 px model: {flops / 1e9:.0f} GFLOP per training pair (fwd + bwd); GPU demand {demand:.0f} "
        f"pairs/s ({source}); this machine: {cpus} CPUs, torch {torch.__version__}"
    )
    print(f"| {'source':13} | workers | {'pairs/s':>8} | {'pairs/s/core':>12} | {'cores per GPU':>13} |")
    print("|---------------|---------|----------|--------------|---------------|")
    with tempfile.TemporaryDirectory(prefix="bench_video_data_") as tmp:
        roots = write_layouts(Path(tmp), args.scale)
        for cached in (False, True):
            for kind, root in roots.items():
                cfg = data_config(kind, root, Path(tmp) / "cache" if cached else None)
                label = f"{kind}{' cache' if cached else ''}"
                if cached:
                    start = time.perf_counter()
                    prepare_cache(cfg)
                    clips = len(open_frames(cfg).clips)
                    rate = clips / (time.perf_counter() - start)
                    print(f"| {label:13} | prepare-data (1 process): {rate:.2f} clips/s |")
                # EgoDex from the mp4: every distinct episode in a batch is decoded whole, so a batch of 1 is
                # what a real epoch pays per pair (its pairs come from thousands of episodes)
                batch, pairs = (1, 8) if kind == "egodex" and not cached else (args.batch, args.pairs)
                for workers in sorted({1, 2, cpus}):
                    rate = pairs_per_second(cfg, workers, pairs, batch)
                    per_core = rate / workers
                    cores = math.ceil(demand / per_core)
                    print(
                        f"| {label:13} | {workers:7} | {rate:8.1f} | {per_core:12.1f} | {cores:13d} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
