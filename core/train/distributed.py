"""Data parallelism across processes for the shared loop (one trial on N GPUs, or N CPU processes with gloo).

Every rank runs the same loop on its shard of each global batch; after backward the gradients are averaged
with one all-reduce over a flat buffer, so the optimiser steps are identical on every rank. This is what
DistributedDataParallel does, without requiring that a family's losses go through `model.forward` (tasks call
`model.embed`, `model.encode`, ...). When a family's loss is a mean over samples and the shards are equal, the
averaged gradient equals the single-process gradient of the whole batch.

The rank variables come from the environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
`MASTER_PORT`), exported by submitit's `TorchDistributedEnvironment` under SLURM or by `torchrun`.
Only rank 0 writes checkpoints, metrics and reports.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def context_from_env() -> DistContext:
    """The rank variables of this process (single process when WORLD_SIZE is unset or 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


# a sweep worker's ranks wait for rank 0's next claim as long as other workers' trials run
GROUP_TIMEOUT = datetime.timedelta(hours=24)


def init_process_group(ctx: DistContext, device: torch.device | None = None) -> None:
    """Join the group once (gloo for CPU tensors and messages, nccl for CUDA tensors); a no-op for a
    single process or when already joined (a sweep worker joins before it knows a trial's device)."""
    if not ctx.enabled or dist.is_initialized():
        return
    cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    if cuda:
        torch.cuda.set_device(ctx.local_rank)
    dist.init_process_group(
        "cpu:gloo,cuda:nccl" if cuda else "gloo",
        rank=ctx.rank,
        world_size=ctx.world_size,
        timeout=GROUP_TIMEOUT,
    )


def broadcast_message(message: Any, ctx: DistContext) -> Any:
    """Rank 0's `message` (any picklable object) on every rank; `message` is ignored on the others."""
    box = [message if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def average_gradients(params: list[torch.nn.Parameter], ctx: DistContext) -> None:
    """Replace every gradient by its mean over ranks (missing gradients count as zeros)."""
    if not ctx.enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def mean_over_ranks(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Mean of scalar metrics over ranks, so that rank 0 logs the loss of the whole global batch."""
    if not ctx.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / ctx.world_size for k, v in zip(keys, t.tolist(), strict=True)}


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True when `flag` holds on some rank (e.g. a non-finite loss): every rank then skips together."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
