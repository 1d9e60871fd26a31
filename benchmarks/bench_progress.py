"""Learnable progress loss, forward + backward: one packed head call vs the seed's per-segment loop.

Run with `python -m benchmarks.bench_progress`. Both sides draw the same segments from identically
seeded generators, so their loss values must agree.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from core.losses.progress import learnable_progress_loss
from core.models.progress_head import ProgressHead
from tests.reference.progress import learnable_progress_loss_loop


def make_batch(n_videos: int, frames: int, dim: int, seed: int) -> tuple[list[torch.Tensor], list[dict]]:
    """Videos of about `frames` frames: background and actions of 10-40 frames alternating."""
    g = torch.Generator().manual_seed(seed)
    embeddings, times = [], []
    for v in range(n_videos):
        T = frames + int(torch.randint(-20, 21, (), generator=g))
        cuts = torch.randint(10, 41, (T // 10,), generator=g).cumsum(0)
        cuts = [0, *[int(c) for c in cuts if c < T], T]
        steps = ["SIL" if i % 2 == 0 else f"step{i // 2}" for i in range(len(cuts) - 1)]
        times.append(
            {"step": steps, "start_frame": cuts[:-1], "end_frame": [c - 1 for c in cuts[1:]], "name": f"v{v}"}
        )
        embeddings.append(torch.randn(T, dim, generator=g))
    return embeddings, times


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_step(
    step: Callable[[], torch.Tensor], params: list[torch.Tensor], repeats: int
) -> tuple[float, float]:
    """Median seconds of one forward + backward, and the loss value."""
    times, value = [], 0.0
    for i in range(repeats + 1):
        for p in params:
            p.grad = None
        _sync()
        start = time.perf_counter()
        loss = step()
        loss.backward()
        _sync()
        if i > 0:  # the first call warms up allocator and kernels
            times.append(time.perf_counter() - start)
        value = float(loss.detach())
    return statistics.median(times), value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # one thread by default: on a shared CPU box OpenMP barriers turn small GRU steps into noise
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    head = ProgressHead(args.dim, 64, use_gru=True, position_encoding=True, learnable_h0=True).to(args.device)
    embeddings, times = make_batch(args.videos, args.frames, args.dim, seed=0)
    embeddings = [e.detach().to(args.device).requires_grad_(True) for e in embeddings]
    params = [*embeddings, *head.parameters()]
    ours_s, ours_v = time_step(
        lambda: learnable_progress_loss(
            head, embeddings, times, k=args.k, generator=torch.Generator().manual_seed(1)
        ),
        params,
        args.repeats,
    )
    ref_s, ref_v = time_step(
        lambda: learnable_progress_loss_loop(
            head, embeddings, times, k=args.k, generator=torch.Generator().manual_seed(1)
        ),
        params,
        args.repeats,
    )
    print(
        f"learnable progress loss, {args.videos} videos x k={args.k} segments, ~{args.frames} frames, "
        f"D={args.dim}, GRU head (fixes A+B), forward+backward, device={args.device}, "
        f"torch threads={torch.get_num_threads()}"
    )
    print(f"  packed (ours):        {ours_s * 1e3:8.2f} ms")
    print(f"  per-segment loop:     {ref_s * 1e3:8.2f} ms")
    print(f"  speed-up:             {ref_s / ours_s:8.1f}x")
    print(f"  |loss difference|:    {abs(ours_v - ref_v):.2e} (loss {ours_v:.6f})")


if __name__ == "__main__":
    main()
