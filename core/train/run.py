"""One run, start to finish: the run directory of DESIGN.md, training, test evaluation, summary.

Layout written here: config.yaml (resolved), metrics.jsonl, summary.json, provenance.json and
diff.patch (core/provenance.py),
checkpoints/{best_model_<name>,last}.pt (one best checkpoint per entry of the family's `best_checkpoints`),
plots/, eval/<checkpoint>.json, and whatever the family's `save` writes (e.g. splits.json).
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from core.atomic import atomic_write_json, atomic_write_text
from core.provenance import DIFF_FILE, PROVENANCE_FILE, provenance
from core.train.checkpoint import load_checkpoint
from core.train.distributed import context_from_env, init_process_group
from core.train.families import family_module
from core.train.loop import Reporter, Task, Trainer, TrainerConfig


def checkpoint_path(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / "checkpoints" / ("last.pt" if name == "last" else f"best_model_{name}.pt")


def checkpoint_names(cfg: DictConfig) -> list[str]:
    """The checkpoints a run of `cfg` keeps, the default evaluation one first."""
    return [*family_module(cfg.family).Task.best_checkpoints, "last"]


_PACKAGES = ("ablate", "torch", "numpy", "hydra-core", "omegaconf", "optuna", "submitit", "wandb", "pandas")


def environment(record: dict[str, Any]) -> dict[str, Any]:
    """The summary's short view of a run's provenance record (the full one is provenance.json)."""
    return {
        "code_hash": record["code_hash"],
        "git_commit": record["git_commit"],
        "git_dirty": record["git_dirty"],
        "snapshot": record["snapshot"],
        "python": record["python"],
        "host": record["host"],
        "gpu": record["gpu"],
        "packages": {name: record["packages"].get(name) for name in _PACKAGES},
    }


def write_provenance(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """provenance.json and diff.patch of this start of the run. A resume rewrites them (the same code
    when it runs from its sweep's snapshot); one that runs other code (`ablate resume --code current`)
    keeps the code of the earlier starts in `earlier_code`, so that the run says it mixed code."""
    record, diff = provenance(cfg.experiment_name, overrides)
    path = run_dir / PROVENANCE_FILE
    if path.exists():
        old = json.loads(path.read_text())
        earlier = old.get("earlier_code", [])
        if old["code_hash"] != record["code_hash"]:
            earlier = [*earlier, {k: old.get(k) for k in ("code_hash", "git_commit", "snapshot")}]
        if earlier:
            record["earlier_code"] = earlier
    atomic_write_text(run_dir / DIFF_FILE, diff)
    atomic_write_json(path, record)
    return record


def gpus_used(device: torch.device) -> int:
    """GPUs this run occupies (all ranks of a data-parallel run), for GPU-hours in the tables."""
    return context_from_env().world_size if device.type == "cuda" else 0


def pick_device(name: str) -> torch.device:
    """`auto` takes a GPU when there is one; a data-parallel rank takes the GPU of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", context_from_env().local_rank)
    return device


def trainer_config(cfg: DictConfig, best: dict[str, str]) -> TrainerConfig:
    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    t.pop("device", None)
    t.pop("num_threads", None)
    return TrainerConfig(**t, seed=cfg.seed, best=best)


def build_task(cfg: DictConfig, run_dir: Path) -> Task:
    if cfg.trainer.num_threads:
        # small models on a shared CPU: extra intra-op threads cost far more than they give
        torch.set_num_threads(cfg.trainer.num_threads)
    torch.manual_seed(cfg.seed)  # model initialisation
    return family_module(cfg.family).Task(cfg, run_dir, pick_device(cfg.trainer.device))


def evaluate_run(run_dir: Path, checkpoint: str | None = None, task: Task | None = None) -> dict[str, float]:
    """Val and test metrics of one checkpoint of a run (default: the family's first best checkpoint), also
    written to eval/<checkpoint>.json."""
    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    checkpoint = checkpoint or checkpoint_names(cfg)[0]
    path = checkpoint_path(run_dir, checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no '{checkpoint}' checkpoint in this run")
    task = task or build_task(cfg, run_dir)
    task.model.load_state_dict(load_checkpoint(path, task.device)["model"])
    metrics = task.evaluate_checkpoint(run_dir, checkpoint)
    atomic_write_json(run_dir / "eval" / f"{checkpoint}.json", metrics)
    return metrics


def run_experiment(
    cfg: DictConfig,
    run_dir: Path,
    reporter: Reporter | None = None,
    task: Task | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir` and write its summary; returns the summary.

    `overrides`: those `cfg` was composed with, recorded in provenance.json for `ablate rerun`.
    Pass a `task` already built by `build_task` to check data before anything else is set up. Under a
    data-parallel launch (RANK / WORLD_SIZE in the environment: submitit's tasks, torchrun) every rank
    trains; only rank 0 writes the run directory, evaluates and reports."""
    run_dir = Path(run_dir)
    task = task or build_task(cfg, run_dir)  # loads and checks the data before anything is written
    ctx = context_from_env()
    if ctx.enabled:
        init_process_group(ctx, task.device)
        if not ctx.is_main:
            trainer = Trainer(task, trainer_config(cfg, task.best_checkpoints), run_dir, None, ctx)
            trainer.resume()
            result = trainer.fit()
            return {"run_dir": str(run_dir), "status": result.status, "rank": ctx.rank}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    task.save(run_dir)
    record = write_provenance(cfg, run_dir, list(overrides or []))
    summary: dict[str, Any] = {
        "experiment": cfg.experiment_name,
        "family": cfg.family,
        "run_dir": str(run_dir),
        "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "environment": {**environment(record), "gpus": gpus_used(task.device), "ranks": ctx.world_size},
    }
    atomic_write_json(run_dir / "summary.json", summary)
    t0 = time.perf_counter()
    try:
        trainer = Trainer(task, trainer_config(cfg, task.best_checkpoints), run_dir, reporter, ctx)
        summary["resumed_from_epoch"] = trainer.start_epoch if trainer.resume() else None
        result = trainer.fit()
        task.after_fit(result.history, run_dir)
        checkpoint = next(iter(task.best_checkpoints))
        test = evaluate_run(run_dir, checkpoint, task) if result.history else {}
    except BaseException as exc:
        summary.update(
            status="failed", reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()
        )
        summary["wall_time_s"] = time.perf_counter() - t0
        atomic_write_json(run_dir / "summary.json", summary)
        raise
    final = result.history[-1] if result.history else {}
    summary.update(
        status=result.status,
        epochs_run=len(result.history),
        skipped_batches=result.skipped_batches,
        first_step_at=result.first_step_at,
        final=final,
        best={name: b for name, b in result.best.items()},
        eval={"checkpoint": checkpoint, **test},
        splits=task.describe(),
        wall_time_s=time.perf_counter() - t0,
    )
    atomic_write_json(run_dir / "summary.json", summary)
    return summary
