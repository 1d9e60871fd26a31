"""Where a run's per-epoch metrics go besides metrics.jsonl: the console and Weights & Biases.

wandb is offline by default (files under the run dir, uploaded later by `ablate sync`); the run id
is derived from the run directory, so a resumed or requeued run continues the same wandb run.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from core.train.loop import Reporter


def wandb_run_id(run_dir: Path) -> str:
    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


class ConsoleReporter:
    """One line per epoch with the headline numbers."""

    KEYS = (
        "train/total_loss",
        "val/total_loss",
        "val/alignment_loss",
        "val/progress_loss",
        "val/ogpe",
        "val/ogpe_action",
    )

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def report(self, epoch: int, metrics: dict[str, float]) -> None:
        parts = [f"{k}={metrics[k]:.4g}" for k in self.KEYS if k in metrics]
        print(f"epoch {epoch + 1}/{self.epochs} " + " ".join(parts), file=sys.stderr, flush=True)


class WandbReporter:
    """Logs config, per-epoch metrics and the final summary to one wandb run."""

    def __init__(self, cfg: DictConfig, run_dir: Path, *, group: str, job_type: str, tags: list[str]) -> None:
        import wandb  # heavy import, only when tracking is on

        log = cfg.logger
        mode = os.environ.get("WANDB_MODE") or log.mode
        self._run = wandb.init(
            project=log.project,
            entity=log.entity,
            group=group,
            job_type=job_type,
            tags=[str(t) for t in tags],
            name=f"{Path(run_dir).parent.name}/{Path(run_dir).name}",
            config=OmegaConf.to_container(cfg, resolve=True),
            dir=str(run_dir),
            id=wandb_run_id(run_dir),
            resume="allow",
            mode=mode,
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True, disable_git=True),
        )

    def report(self, epoch: int, metrics: dict[str, float]) -> None:
        # committed now: otherwise the last epoch's row is only flushed by finish() and overwrites the
        # evaluated val/* values written to the summary there
        self._run.log(metrics, step=epoch, commit=True)

    def finish(self, summary: dict[str, Any], exit_code: int = 0) -> None:
        for key, value in (summary.get("eval") or {}).items():
            self._run.summary[key] = value
        for key, best in (summary.get("best") or {}).items():
            self._run.summary[f"best/{key}"] = best["value"]
        self._run.summary["status"] = summary.get("status")
        for key in ("wall_time_s", "reason", "epochs_run"):
            if summary.get(key) is not None:
                self._run.summary[key] = summary[key]
        commit = (summary.get("environment") or {}).get("git_commit")
        if commit:
            self._run.summary["git_commit"] = commit
        self._run.finish(exit_code=exit_code)


class Reporters:
    """Fan one report out to several reporters (a pruning reporter may raise and stop the run)."""

    def __init__(self, reporters: list[Reporter]) -> None:
        self.reporters = reporters

    def report(self, epoch: int, metrics: dict[str, float]) -> None:
        for r in self.reporters:
            r.report(epoch, metrics)
