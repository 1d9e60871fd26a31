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
import time
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from core.metrics.representation import per_pair_mse
from core.models.two_stream import build_two_stream
from launchers.config import compose_experiment

# model name -> the experiment whose `model` section it benchmarks (the shipped configs, not copies)
EXPERIMENTS = {"tiny": "video_two_stream", "224px": "video_two_stream_224"}
MODELS = {
    name: OmegaConf.to_container(compose_experiment(experiment).model, resolve=True)
    for name, experiment in EXPERIMENTS.items()
}


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
    # one thread by default: on a shared CPU box more threads make small ops slower, not faster
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

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
