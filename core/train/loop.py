"""The one training loop every family shares.

A family supplies a `Task` (model, batches, losses, per-epoch evaluation); the loop owns the rest:
optimiser and schedule, zero_grad every step, gradient clipping, skipping non-finite or exploding
batches, per-epoch validation, best/last checkpoints, exact resume and metric reporting. It knows
nothing of launchers or sweeps: a reporter passed in may stop the run by raising `Pruned`.

A stop request (`core.train.signals`, e.g. SLURM's USR2 before a time limit) ends the current batch,
saves a mid-epoch `last.pt` and raises `Interrupted`; resuming from it continues inside the epoch and
ends exactly where the uninterrupted run ends.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from tqdm.auto import tqdm

from core.atomic import atomic_write_text
from core.train.checkpoint import load_checkpoint, save_checkpoint
from core.train.distributed import SINGLE, DistContext, any_rank, average_gradients, mean_over_ranks
from core.train.signals import stop_requested


class Pruned(Exception):
    """Raised by a reporter to stop a run early (e.g. an Optuna pruner decided)."""


class TrainingFailed(RuntimeError):
    """The run cannot go on (too many skipped batches, non-finite parameters); the message says why."""


class Interrupted(Exception):
    """A stop was requested (a signal: preemption, time limit, cancel); `checkpoint` holds the state to
    resume from: `batch` batches of epoch `epoch` are done (0: the epoch has not started)."""

    def __init__(self, reason: str, epoch: int, batch: int, checkpoint: Path) -> None:
        self.reason, self.epoch, self.batch, self.checkpoint = reason, epoch, batch, checkpoint
        where = f"after batch {batch} of epoch {epoch}" if batch else f"before epoch {epoch}"
        super().__init__(f"stopped by {reason} {where}; saved {checkpoint}")


class Reporter(Protocol):
    def report(self, epoch: int, metrics: dict[str, float]) -> None: ...


class Task(ABC):
    """What a family plugs into the loop and into a run (`core.train.run`): the one declared interface.

    A family module's `Task(cfg, run_dir, device)` subclasses it. Abstract methods are required; every
    other hook has its default here, so the loop never asks whether a task has one."""

    model: torch.nn.Module
    device: torch.device = torch.device("cpu")
    # checkpoint name -> validation metric whose minimum it keeps; the first is the one evaluated at the end
    best_checkpoints: ClassVar[dict[str, str]] = {"best": "val/total_loss"}

    @abstractmethod
    def train_batches(self, epoch: int, generator: torch.Generator) -> Iterable[Any]:
        """The epoch's batches; all draws from `generator` happen before the first batch is yielded
        (the loop rebuilds a half-done epoch from the generator's state at its start)."""

    @abstractmethod
    def val_batches(self) -> Iterable[Any]: ...

    @abstractmethod
    def losses(self, batch: Any, epoch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Scalar losses; `total_loss` is the one optimised."""

    @abstractmethod
    def evaluate(self, split: str, epoch: int) -> dict[str, float]:
        """Task metrics on a split (e.g. OGPE), keys without the split prefix."""

    @abstractmethod
    def evaluate_checkpoint(self, run_dir: Path, checkpoint: str) -> dict[str, float]:
        """`val/...` and `test/...` metrics of the loaded weights; may draw plots under run_dir/plots."""

    # ------------------------------------------------------------------ optional hooks and their defaults
    def train_batches_from(self, epoch: int, generator: torch.Generator, start: int) -> Iterator[Any]:
        """Batches `start`.. of the epoch `train_batches(epoch, generator)` yields (a resumed epoch), after
        the same draws. Default: rebuild the epoch and skip its first `start` batches; a task whose batches
        are costly to read overrides it to skip them unread. Fewer than `start` batches: ValueError."""
        batches = iter(self.train_batches(epoch, generator))
        done = sum(1 for _ in itertools.islice(batches, start))
        if done < start:
            raise ValueError(f"the epoch has {done} batches, fewer than {start}")
        return batches

    def param_groups(self) -> list[Any]:
        """The optimiser's parameters or param groups (per-module learning rates); default: every
        trainable parameter in one group at trainer.lr."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def lr_factor(self, epoch: int) -> float | None:
        """Multiplier of every group's lr in `epoch` when the task has its own schedule; None (default):
        the trainer's warmup + cosine/constant schedule."""
        return None

    def shard_batch(self, batch: Any, rank: int, world_size: int) -> Any:
        """This rank's share of a global batch for data-parallel training. Default: the task cannot
        train data-parallel (the trainer refuses it before the first step)."""
        raise TrainingFailed(f"{type(self).__name__} has no shard_batch(): it cannot train data-parallel")

    def save(self, run_dir: Path) -> None:
        """Write what a later evaluation needs to see the same data (e.g. the splits); default: nothing."""
        return

    def describe(self) -> dict[str, Any]:
        """A few facts about the data for the summary (split sizes); default: none."""
        return {}

    def after_fit(self, history: list[dict[str, float]], run_dir: Path) -> None:
        """End-of-training artefacts (loss curves); default: none."""
        return


@dataclass
class TrainerConfig:
    epochs: int = 10
    optimizer: str = "adam"  # adam | adamw
    lr: float = 1e-4
    weight_decay: float = 0.0
    scheduler: str = "none"  # none | cosine
    warmup_epochs: int = 0
    grad_clip: float | None = 1.0
    explode_threshold: float = 1e7
    max_skipped_fraction: float = 0.5
    eval_every: int = 1
    seed: int = 0
    progress_bar: bool | None = None  # None: only on a terminal
    # checkpoint name -> validation metric whose minimum it keeps
    best: dict[str, str] = field(default_factory=lambda: {"best": "val/total_loss"})


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best: dict[str, dict[str, float]]  # checkpoint name -> {"value", "epoch"}
    status: str  # completed | pruned
    skipped_batches: int
    first_step_at: float | None


def _make_optimizer(task: Task, cfg: TrainerConfig) -> torch.optim.Optimizer:
    """The task's `param_groups()` (default: its trainable parameters), each at trainer.lr unless the group
    sets its own."""
    params = task.param_groups()
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"trainer.optimizer must be 'adam' or 'adamw', got {cfg.optimizer!r}")


def _make_scheduler(
    opt: torch.optim.Optimizer, cfg: TrainerConfig, task: Task
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-epoch multiplier of every group's lr: the task's `lr_factor(epoch)` when it has its own schedule,
    else linear warmup then cosine to 0, or constant."""

    def factor(epoch: int) -> float:
        own = task.lr_factor(epoch)
        if own is not None:
            return own
        if epoch < cfg.warmup_epochs:
            return (epoch + 1) / (cfg.warmup_epochs + 1)
        if cfg.scheduler == "cosine":
            span = max(cfg.epochs - cfg.warmup_epochs, 1)
            return 0.5 * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))
        return 1.0

    if cfg.scheduler not in ("none", "cosine"):
        raise ValueError(f"trainer.scheduler must be 'none' or 'cosine', got {cfg.scheduler!r}")
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _mean_losses(rows: list[dict[str, float]], prefix: str) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    return {
        f"{prefix}/{k}": sum(r[k] for r in rows if k in r) / max(sum(k in r for r in rows), 1) for k in keys
    }


def _progress(items: Iterable[Any], desc: str, enabled: bool) -> Iterator[Any]:
    yield from tqdm(items, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)


class Trainer:
    """Runs `task` for `cfg.epochs` in `run_dir`, resuming from `checkpoints/last.pt` when present.

    Data parallel when `dist` has several ranks: each rank steps on `task.shard_batch(batch, rank, world)`,
    gradients are averaged before the (identical) optimiser steps, and only rank 0 writes and reports."""

    def __init__(
        self,
        task: Task,
        cfg: TrainerConfig,
        run_dir: Path,
        reporter: Reporter | None = None,
        dist: DistContext = SINGLE,
    ):
        self.task, self.cfg, self.run_dir, self.reporter, self.dist = task, cfg, Path(run_dir), reporter, dist
        if dist.enabled and type(task).shard_batch is Task.shard_batch:
            raise TrainingFailed(f"{type(task).__name__} has no shard_batch(): it cannot train data-parallel")
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.optimizer = _make_optimizer(task, cfg)
        self.scheduler = _make_scheduler(self.optimizer, cfg, task)
        self.params = [p for p in task.model.parameters() if p.requires_grad]
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.history: list[dict[str, float]] = []
        self.best: dict[str, dict[str, float]] = {}
        self.skipped = 0
        self.start_epoch = 0
        self.start_batch = 0  # batches of `start_epoch` already done by the run resumed from
        self._partial: dict[str, Any] | None = None  # the half-done epoch of a mid-epoch checkpoint
        self.first_step_at: float | None = None  # wall clock of this process's first optimiser step

    # ------------------------------------------------------------------ state
    def _state(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,  # the last completed epoch (-1: none)
            "model": self.task.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "best": self.best,
            "skipped": self.skipped,
        }

    def resume(self) -> bool:
        """Restore everything from last.pt; the rest of the run then equals the uninterrupted one.

        A checkpoint saved on a stop request also holds the half-done epoch ("partial": batches done,
        skipped, their loss rows, the generator at the epoch's start and once its order was drawn)."""
        path = self.ckpt_dir / "last.pt"
        if not path.exists():
            return False
        state = load_checkpoint(path)
        self.task.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.history, self.best, self.skipped = state["history"], state["best"], state["skipped"]
        self.start_epoch = state["epoch"] + 1
        self._partial = state.get("partial")
        self.start_batch = self._partial["batches"] if self._partial else 0
        self._write_metrics()  # drop rows logged after the checkpoint by the interrupted run
        return True

    def _save(self, path: Path, state: dict[str, Any]) -> None:
        if self.dist.is_main:
            save_checkpoint(path, state)

    def _write_metrics(self) -> None:
        if not self.dist.is_main:
            return
        atomic_write_text(
            self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.history)
        )

    # ------------------------------------------------------------------ epochs
    def _step(self, batch: Any, epoch: int) -> dict[str, float] | None:
        """One optimiser step; the batch's losses (mean over ranks), or None when it was skipped (non-finite,
        exploding: on any rank, so that every rank skips together)."""
        if self.dist.enabled:
            batch = self.task.shard_batch(batch, self.dist.rank, self.dist.world_size)
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.task.losses(batch, epoch, self.generator)
        total = losses["total_loss"]
        if any_rank(not torch.isfinite(total) or total.item() > self.cfg.explode_threshold, self.dist):
            return None
        total.backward()
        average_gradients(self.params, self.dist)
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        if self.first_step_at is None:
            self.first_step_at = time.time()
        return mean_over_ranks({k: float(v.detach()) for k, v in losses.items()}, self.dist)

    def _remaining_batches(self, epoch: int, part: dict[str, Any]) -> Iterator[Any]:
        """The batches of `epoch` not done yet. A resumed epoch is rebuilt from a copy of the generator
        as it was at the epoch's start, minus its done batches; the live generator, restored from the
        checkpoint, goes on with the draws of the losses exactly where the interrupted run stopped."""
        if not part["batches"]:
            return iter(self.task.train_batches(epoch, self.generator))
        gen = torch.Generator().set_state(part["epoch_generator"])
        try:
            batches: Iterator[Any] | None = self.task.train_batches_from(epoch, gen, part["batches"])
        except ValueError:  # fewer batches than were done
            batches = None
        if batches is None or not torch.equal(gen.get_state(), part["order_generator"]):
            raise TrainingFailed(
                f"cannot resume epoch {epoch} after batch {part['batches']} of {self.ckpt_dir / 'last.pt'}: "
                f"the task's train_batches differ from the interrupted run's (other data, or draws "
                f"from the generator after the first batch)"
            )
        return batches

    def _train_epoch(self, epoch: int, show: bool) -> dict[str, float]:
        self.task.model.train()
        part = self._partial or {
            "epoch_generator": self.generator.get_state(),
            "order_generator": None,  # the generator once the batch order is drawn
            "batches": 0,
            "skipped": 0,
            "rows": [],
        }
        self._partial = None
        for batch in _progress(self._remaining_batches(epoch, part), f"epoch {epoch}", show):
            if part["order_generator"] is None:
                part["order_generator"] = self.generator.get_state()
            row = self._step(batch, epoch)
            part["batches"] += 1
            if row is None:
                part["skipped"] += 1
            else:
                part["rows"].append(row)
            if (reason := self._stop_reason()) is not None:
                path = self.ckpt_dir / "last.pt"
                self._save(path, {**self._state(epoch - 1), "partial": part})
                raise Interrupted(reason, epoch, part["batches"], path)
        n_batches, skipped = part["batches"], part["skipped"]
        self.skipped += skipped
        if n_batches and skipped / n_batches > self.cfg.max_skipped_fraction:
            raise TrainingFailed(
                f"epoch {epoch}: {skipped}/{n_batches} batches had a non-finite or exploding loss "
                f"(> {self.cfg.explode_threshold:g}); more than trainer.max_skipped_fraction="
                f"{self.cfg.max_skipped_fraction}"
            )
        out = _mean_losses(part["rows"], "train")
        out["train/skipped_batches"] = float(skipped)
        return out

    @torch.no_grad()
    def _validate(self, epoch: int) -> dict[str, float]:
        self.task.model.eval()
        # a fixed generator: validation losses of different epochs see the same samples
        gen = torch.Generator().manual_seed(self.cfg.seed + 1)
        rows = [
            {k: float(v) for k, v in self.task.losses(b, epoch, gen).items()} for b in self.task.val_batches()
        ]
        out = _mean_losses(rows, "val")
        if (self.cfg.eval_every and (epoch + 1) % self.cfg.eval_every == 0) or epoch == self.cfg.epochs - 1:
            out.update({f"val/{k}": v for k, v in self.task.evaluate("val", epoch).items()})
        return out

    def _save_best(self, epoch: int, metrics: dict[str, float]) -> None:
        for name, key in self.cfg.best.items():
            value = metrics.get(key)
            if value is None or not math.isfinite(value):
                continue
            if name not in self.best or value < self.best[name]["value"]:
                self.best[name] = {"value": value, "epoch": epoch}
                self._save(
                    self.ckpt_dir / f"best_model_{name}.pt",
                    {"epoch": epoch, "model": self.task.model.state_dict()},
                )

    def _pruned(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Rank 0 reports; its reporter's `Pruned` stops every rank."""
        pruned = False
        if self.reporter is not None and self.dist.is_main:
            try:
                self.reporter.report(epoch, metrics)
            except Pruned:
                pruned = True
        return any_rank(pruned, self.dist)

    def _stop_reason(self) -> str | None:
        """A stop requested on any rank stops all of them at the same batch."""
        reason = stop_requested()
        if not any_rank(reason is not None, self.dist):
            return None
        return reason or "a stop request on another rank"

    def fit(self) -> FitResult:
        """Train the remaining epochs. A stop request raises `Interrupted` once its checkpoint is saved
        (none at the end of the last epoch: the run is complete); a reporter's `Pruned` ends the run."""
        show = self.cfg.progress_bar if self.cfg.progress_bar is not None else sys.stderr.isatty()
        status = "completed"
        for epoch in range(self.start_epoch, self.cfg.epochs):
            t0 = time.perf_counter()
            metrics: dict[str, float] = {"epoch": float(epoch)}
            metrics.update(self._train_epoch(epoch, show))
            metrics.update(self._validate(epoch))
            metrics["lr"] = self.optimizer.param_groups[0]["lr"]
            metrics["epoch_time_s"] = time.perf_counter() - t0
            self.scheduler.step()
            self._save_best(epoch, metrics)
            self.history.append(metrics)
            self._save(self.ckpt_dir / "last.pt", self._state(epoch))
            self._write_metrics()
            if self._pruned(epoch, metrics):
                status = "pruned"
                break
            if (reason := self._stop_reason()) is not None and epoch + 1 < self.cfg.epochs:
                raise Interrupted(reason, epoch + 1, 0, self.ckpt_dir / "last.pt")
        return FitResult(self.history, self.best, status, self.skipped, self.first_step_at)
