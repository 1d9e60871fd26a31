"""Training throughput (pairs/s) of the two-stream video predictor: the tiny and the original 224 px model.

Run with `python -m benchmarks.bench_video`. One training step is what the video family's Task and the
shared loop do: forward (bf16 autocast where enabled), the gap-weighted per-pair MSE, backward, gradient
clipping, an AdamW step. On CPU both models run in float32; on a GPU each model also runs with bf16
autocast, channels-last memory format and torch.compile, on and off, printed as one table.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from core.metrics.representation import per_pair_mse
from core.models.two_stream import build_two_stream
from launchers.config import compose_experiment

# model name -> the experiment whose `model` section it benchmarks (the shipped configs, not copies)
EXPERIMENTS = {"tiny": "video_two_stream", "224px": "video_two_stream_224"}
MODELS = {
    name: OmegaConf.to_container(compose_experiment(experiment).model, resolve=True)
    for name, experiment in EXPERIMENTS.items()
}


H100_BF16_PEAK = 989e12  # FLOP/s, dense bf16 tensor cores (SXM)


def training_flops_per_pair() -> float:
    """FLOPs of one pair's forward + backward through the shipped 224 px model (decoder D)."""
    with torch.device("meta"):
        model = build_two_stream(**MODELS["224px"])
        img_t, img_tk = torch.rand(1, 3, 224, 224), torch.rand(1, 3, 224, 224)
    counter = FlopCounterMode(display=False)
    with counter:
        per_pair_mse(model(img_t, img_tk)["pred"], img_tk).mean().backward()
    return float(counter.get_total_flops())


@dataclass(frozen=True)
class Setting:
    model: str
    device: str
    batch: int
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(s: Setting, steps: int, warmup: int) -> tuple[float, float]:
    """Median seconds per training step and the last loss, after `warmup` steps (compilation included)."""
    torch.manual_seed(0)
    model = build_two_stream(**MODELS[s.model]).to(s.device)
    fmt = torch.channels_last if s.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    forward = torch.compile(model) if s.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    size = MODELS[s.model]["image_size"]
    g = torch.Generator().manual_seed(0)
    img_t, img_tk = (
        torch.rand(s.batch, 3, size, size, generator=g).to(s.device, memory_format=fmt) for _ in range(2)
    )
    weight = torch.exp(-0.7 * (torch.randint(1, 11, (s.batch,), generator=g) - 1.0)).to(s.device)
    autocast = (
        torch.autocast(device_type=s.device.split(":")[0], dtype=torch.bfloat16)
        if s.bf16
        else contextlib.nullcontext()
    )
    times, loss = [], torch.zeros(())
    for i in range(warmup + steps):
        _sync(s.device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            pred = forward(img_t, img_tk)["pred"]
        loss = (weight * per_pair_mse(pred.float(), img_tk)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        _sync(s.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), float(loss.detach())


def measure_fed(kind: str, batch: int, steps: int, warmup: int, workers: int | None) -> tuple[float, float]:
    """(pairs/s, fraction of the time spent waiting for data) of the 224 px model (bf16 and channels-last
    on CUDA) trained on pairs that the streaming pipeline reads from the frame cache of a `kind` dataset
    written here: what a real run gets, input pipeline included."""
    from benchmarks.bench_video_data import data_config, write_layouts
    from core.data.clips import sample_pairs
    from core.data.loader import PairBatches, default_num_workers, pair_loader
    from core.data.sources import open_frames

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device == "cuda"
    with tempfile.TemporaryDirectory(prefix="bench_video_") as tmp:
        root = write_layouts(Path(tmp), 4, (kind,))[kind]
        store = open_frames(data_config(kind, root, Path(tmp) / "cache"))
        lengths = [c.num_frames for c in store.clips]
        sample = sample_pairs(
            lengths, batch * (warmup + steps), 10, generator=torch.Generator().manual_seed(0)
        )
        loader = pair_loader(
            PairBatches(store, range(len(lengths)), sample, batch),
            num_workers=default_num_workers() if workers is None else workers,
            pin_memory=cuda,
        )
        torch.manual_seed(0)
        channels_last = torch.channels_last
        model = build_two_stream(**MODELS["224px"]).to(device, memory_format=channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        warmup = max(warmup, 1)  # the first batch waits for the workers to start
        waited, start, done = 0.0, 0.0, time.perf_counter()  # done: when the previous step finished
        for i, item in enumerate(loader):
            arrived = time.perf_counter()  # from `done` to here the GPU had nothing to do
            if i == warmup:
                start = done
            if i >= warmup:
                waited += arrived - done
            img_t, img_tk = (
                x.to(device, non_blocking=cuda).float().div_(255).contiguous(memory_format=channels_last)
                for x in (item.img_t, item.img_tk)
            )
            weight = item.weight.to(device)
            opt.zero_grad(set_to_none=True)
            with autocast:
                pred = model(img_t, img_tk)["pred"]
            (weight * per_pair_mse(pred.float(), img_tk)).mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            _sync(device)
            done = time.perf_counter()
        total = done - start
    return steps * batch / total, waited / total


def settings(args: argparse.Namespace) -> list[Setting]:
    batch = {"tiny": args.batch_tiny, "224px": args.batch_224}
    out = [Setting(m, "cpu", batch[m] if m == "tiny" else args.batch_224_cpu) for m in MODELS]
    if torch.cuda.is_available() and not args.cpu_only:
        for m in MODELS:
            out.append(Setting(m, "cuda", batch[m]))
            for channels_last in (False, True):
                for compiled in (False, True):
                    out.append(Setting(m, "cuda", batch[m], True, channels_last, compiled))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (3 or more with compile)")
    parser.add_argument("--batch-tiny", type=int, default=32)
    parser.add_argument("--batch-224", type=int, default=32, help="224 px batch on the GPU")
    parser.add_argument("--batch-224-cpu", type=int, default=2)
    parser.add_argument("--cpu-only", action="store_true")
    parser.add_argument(
        "--data",
        choices=["bridge", "libero", "egodex"],
        help="instead: train the 224 px model fed by the streaming pipeline from this layout's frame cache; "
        "prints pairs/s, MFU and the share of time the GPU waited for data",
    )
    parser.add_argument("--workers", type=int, help="loader workers with --data (default: CPUs - 1)")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_PEAK / 1e12, help="for the MFU")
    # one thread by default: on a shared CPU box more threads make small ops slower, not faster
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if args.data:
        rate, waiting = measure_fed(args.data, args.batch_224, args.steps, args.warmup, args.workers)
        mfu = rate * training_flops_per_pair() / (args.peak_tflops * 1e12)
        print(
            f"224 px model fed from the {args.data} frame cache, batch {args.batch_224}: {rate:.1f} pairs/s, "
            f"MFU {mfu:.1%} (of {args.peak_tflops:.0f} TFLOP/s), waiting for data {waiting:.1%} of the time"
        )
        return
    print(
        f"two-stream predictor (decoder D), training step = forward, weighted MSE, backward, clip, AdamW; "
        f"median of {args.steps} steps after {args.warmup} warm-up; torch {torch.__version__}, "
        f"CPU threads {torch.get_num_threads()}"
        + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU")
    )
    header = (
        f"| {'model':6} | {'device':6} | {'precision':9} | {'channels_last':13} | {'compile':7} | batch |"
    )
    header += f" {'ms/step':>9} | {'pairs/s':>9} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for s in settings(args):
        warmup = max(args.warmup, 3) if s.compile else args.warmup
        try:
            sec, _ = measure(s, args.steps, warmup)
            cells = f"{sec * 1e3:9.1f} | {s.batch / sec:9.1f}"
        except (RuntimeError, torch.OutOfMemoryError) as exc:  # e.g. no compiler toolchain for compile
            cells = f"{'failed':>9} | {type(exc).__name__:>9}"
        precision = "bf16" if s.bf16 else "fp32"
        print(
            f"| {s.model:6} | {s.device:6} | {precision:9} | {s.channels_last!s:13} | {s.compile!s:7} | "
            f"{s.batch:5} | {cells} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
