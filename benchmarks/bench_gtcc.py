"""GTCC loss speed: the batched `gtcc_loss` vs the per-pair, per-anchor loop port of the release algorithm.

Batch of 4 videos x 200 frames, D = 128, in-the-wild defaults (K = 15, delta = 0.2, gamma = 0.95); forward
+ backward. Both take the same anchors and windows (same generator seed, same sampler). Timed in float32
(the training dtype); the values are compared in float32 and in float64, where rounding cannot steer the
two L-BFGS fits apart (in float32 the fit amplifies rounding, in either implementation: see
core/losses/gtcc.py, so the float32 row is context, not a correctness check).
Run: `python -m benchmarks.bench_gtcc` (about a minute).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from core.losses.gtcc import gtcc_loss
from tests.reference.tcc_gtcc import gtcc_loss_loop

BATCH, FRAMES, DIM = 4, 200, 128
SETTINGS = {"n_components": 15, "gamma": 0.95, "delta": 0.2}
TARGET_SPEEDUP = 20.0

Batch = tuple[list[torch.Tensor], list[torch.Tensor]]


def make_batch(dtype: torch.dtype, seed: int = 0) -> Batch:
    """Videos that walk one smooth random trajectory at different speeds (alignable, like real embeddings)."""
    gen = torch.Generator().manual_seed(seed)
    steps = 2 * FRAMES
    path = 0.05 * torch.randn(steps + 1, DIM, generator=gen).cumsum(0)  # (S + 1, D)
    times = torch.rand(BATCH, FRAMES, generator=gen).sort(dim=1).values * steps  # (B, T) random speeds
    low = times.floor().long().clamp(max=steps - 1)
    frac = (times - low)[..., None]
    frames = path[low] * (1 - frac) + path[low + 1] * frac  # (B, T, D)
    frames = frames + 0.05 * torch.randn(BATCH, FRAMES, DIM, generator=gen)
    sequences = [video.to(dtype).requires_grad_() for video in frames]
    dropouts = [(0.1 * torch.randn(DIM + 1, generator=gen)).to(dtype).requires_grad_() for _ in range(BATCH)]
    return sequences, dropouts


def run(
    loss_fn: Callable[..., torch.Tensor], batch: Batch, repeats: int
) -> tuple[float, float, tuple[torch.Tensor, ...]]:
    """Best forward+backward time over `repeats`, the loss and the gradients (same anchors every time)."""
    sequences, dropouts = batch
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        loss = loss_fn(sequences, dropouts, generator=torch.Generator().manual_seed(0), **SETTINGS)
        grads = torch.autograd.grad(loss, sequences + dropouts)
        best = min(best, time.perf_counter() - start)
    return best, loss.item(), grads


def _max_relative(fast: tuple[torch.Tensor, ...], slow: tuple[torch.Tensor, ...]) -> float:
    scale = max(float(g.abs().max()) for g in slow)
    return max(float((a - b).abs().max()) for a, b in zip(fast, slow, strict=True)) / scale


def main(threads: int = 1) -> None:
    """Print both times, the speed-up and the loss differences.

    One thread by default: timings on a shared machine are then stable, and the loop port (tiny ops) would
    not use more threads anyway, so this is the conservative setting for the ratio.
    """
    torch.set_num_threads(threads)
    print(f"GTCC forward+backward, {BATCH} videos x {FRAMES} frames, D={DIM}, {SETTINGS}, threads={threads}")
    batch32 = make_batch(torch.float32)
    run(gtcc_loss, batch32, repeats=1)  # warm-up
    fast_s, fast32, fast32_grads = run(gtcc_loss, batch32, repeats=5)
    loop_s, loop32, loop32_grads = run(gtcc_loss_loop, batch32, repeats=1)
    speedup = loop_s / fast_s
    print(f"  batched gtcc_loss : {fast_s * 1e3:9.1f} ms (best of 5)")
    print(f"  loop port         : {loop_s * 1e3:9.1f} ms (1 run)")
    print(
        f"  speed-up          : {speedup:9.1f}x (target >= {TARGET_SPEEDUP:.0f}x: "
        f"{'ok' if speedup >= TARGET_SPEEDUP else 'BELOW TARGET'})"
    )
    batch64 = make_batch(torch.float64)  # the same values, upcast
    _, fast64, fast64_grads = run(gtcc_loss, batch64, repeats=1)
    _, loop64, loop64_grads = run(gtcc_loss_loop, batch64, repeats=1)
    relative = abs(fast64 - loop64) / abs(loop64)
    print(
        f"  float64 loss      : {fast64:.9f} vs {loop64:.9f}: max abs diff {abs(fast64 - loop64):.3g}, "
        f"{relative:.2g} relative (target <= 1e-4: {'ok' if relative <= 1e-4 else 'ABOVE TARGET'}); "
        f"gradients {_max_relative(fast64_grads, loop64_grads):.2g} relative to their max"
    )
    print(
        f"  float32 loss      : {fast32:.6f} vs {loop32:.6f}: max abs diff {abs(fast32 - loop32):.3g}, "
        f"{abs(fast32 - loop32) / abs(loop32):.2g} relative; gradients "
        f"{_max_relative(fast32_grads, loop32_grads):.2g} relative to their max"
    )
    print(
        "  float32 rounding alone (float32 vs float64 run of the same code): "
        f"batched {abs(fast32 - fast64) / abs(fast64):.2g}, "
        f"loop port {abs(loop32 - loop64) / abs(loop64):.2g} relative"
    )


if __name__ == "__main__":
    main()
