"""Which module trains which family, and the checks every family shares.

A family module exposes `Task` (a subclass of `core.train.loop.Task`, built as `Task(cfg, run_dir, device)`),
`check_config(cfg)` (ValueError naming the key) and `logged_metrics(cfg)` (every metric name a run logs, so a
sweep can reject an objective that never appears). Modules are imported on first use: a progress run never
pays for the video or slots code.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from omegaconf import DictConfig

FAMILY_MODULES = {
    "progress": "core.train.progress",
    "slots": "core.train.slots",
    "video": "core.train.video",
}

# logged by the shared loop for every family (core/train/loop.py)
LOOP_METRICS = {"train/skipped_batches", "lr", "epoch", "epoch_time_s"}


def family_module(name: str) -> ModuleType:
    if name not in FAMILY_MODULES:
        raise ValueError(f"family={name!r}: available families are {sorted(FAMILY_MODULES)}")
    return importlib.import_module(FAMILY_MODULES[name])


def check_config(cfg: DictConfig) -> None:
    """Reject a config that cannot train before anything is written; ValueError names the key."""
    family = family_module(cfg.family)
    t = cfg.trainer
    problems = []
    if not (isinstance(t.epochs, int) and t.epochs >= 1):
        problems.append("trainer.epochs must be an integer >= 1")
    if not (isinstance(t.lr, float | int) and t.lr > 0):
        problems.append("trainer.lr must be a positive number")
    try:
        family.check_config(cfg)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        raise ValueError("; ".join(problems))


def logged_metrics(cfg: DictConfig) -> set[str]:
    return family_module(cfg.family).logged_metrics(cfg) | LOOP_METRICS
