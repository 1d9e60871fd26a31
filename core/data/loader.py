"""The video family's input pipeline: a DataLoader whose worker processes read and resize the frames of
pairs drawn beforehand.

The pairs of an epoch are drawn in the training process before the first batch (`sample_pairs`), so a
resumed epoch rebuilds exactly the same batches; the loader only reads them. One dataset item is one
batch (a worker reads the 2B frames of a batch at once and decodes each distinct frame once); items
are uint8, 4x less to copy between processes and to the GPU than float, and converted to float on the
device. With several data-parallel ranks each rank's loader reads only its rows of every global batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from core.data.clips import PairSample
from core.data.frames import FrameStore, read_pairs


def default_num_workers() -> int:
    """The CPUs this task may use minus one (the training process): SLURM_CPUS_PER_TASK when SLURM set
    it, else this process's CPU affinity (which also honours taskset and cgroup cpusets); at least 0."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    cpus = int(slurm) if slurm and slurm.isdigit() else len(os.sched_getaffinity(0))
    return max(cpus - 1, 0)


class PairItems(NamedTuple):
    """One batch as read by a worker: uint8 frames (B, 3, S, S) and the pairs' gaps and loss weights."""

    img_t: torch.Tensor
    img_tk: torch.Tensor
    k: torch.Tensor
    weight: torch.Tensor


class PairBatches(Dataset):
    """Batch `i` = pairs [i * batch_size, (i + 1) * batch_size) of `sample`, this rank's rows of it."""

    def __init__(
        self,
        store: FrameStore,
        videos: Sequence[int],
        sample: PairSample,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(
                f"data.batch_size={batch_size} is not divisible by {world_size} ranks "
                "(data.pairs_per_epoch too)"
            )
        self.store, self.videos, self.sample = store, list(videos), sample
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __len__(self) -> int:
        return -(-len(self.sample.t) // self.batch_size)

    def rows(self, index: int) -> slice:
        start = index * self.batch_size
        n = min(self.batch_size, len(self.sample.t) - start)
        if n % self.world_size:
            raise ValueError(
                f"a batch of {n} pairs cannot be split over {self.world_size} ranks: make "
                "data.pairs_per_epoch a multiple of data.batch_size"
            )
        share = n // self.world_size
        return slice(start + self.rank * share, start + (self.rank + 1) * share)

    def __getitem__(self, index: int) -> PairItems:
        part = PairSample(*(x[self.rows(index)] for x in self.sample))
        img_t, img_tk = read_pairs(self.store, self.videos, part)  # (b, S, S, 3) uint8 each
        return PairItems(
            torch.from_numpy(img_t).permute(0, 3, 1, 2),
            torch.from_numpy(img_tk).permute(0, 3, 1, 2),
            part.k,
            part.weight,
        )


def pair_loader(
    batches: PairBatches,
    *,
    start: int = 0,
    num_workers: int,
    prefetch_factor: int = 2,
    pin_memory: bool = False,
) -> Iterator[PairItems]:
    """Batches `start`.. of `batches` in order, read ahead by `num_workers` processes (0: in this one)."""
    indices = range(start, len(batches))
    if not indices:
        return iter(())
    loader = DataLoader(
        batches,
        batch_size=None,  # an item is already a batch
        sampler=indices,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers else None,
        pin_memory=pin_memory,
        # its own generator: the workers' seeds must not draw from torch's global stream, which the
        # training randomness (and a checkpoint's torch_rng) owns
        generator=torch.Generator().manual_seed(0),
    )
    return iter(loader)
