"""A sweep worker: claim a trial, train it (resuming its run dir), record the outcome, repeat.

Any number of workers, on any hosts that share the sweep dir (and the storage), drain one sweep.
A worker leaves when nothing is waiting and no other worker still runs a trial: while others run, it
lingers, so that a trial whose worker died is recovered (after the lease timeout) and re-run here.

    python -m launchers.sweeps.worker SWEEP_DIR --worker NAME
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from submitit.core.utils import UncompletedJobError

from core.train.loop import Pruned
from core.train.run import run_experiment
from launchers.config import compose_experiment
from launchers.sweeps.study import Claim, SweepStudy
from launchers.tracking import ConsoleReporter, Reporters, WandbReporter


class LeaseLost(Exception):
    """Another worker declared this trial lost (no heartbeat reached it) and re-enqueued it."""


def log(worker: str, msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {worker}: {msg}", file=sys.stderr, flush=True)


class Lease:
    """Keeps a claimed trial's heartbeat fresh from a daemon thread while it runs, and notices when
    the trial was declared lost anyway (e.g. this process was stalled), so that the run stops instead
    of racing its own retry in the same run dir."""

    def __init__(self, study: SweepStudy, claim: Claim, worker: str) -> None:
        self.study, self.claim, self.worker = study, claim, worker
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{claim.number}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.study.spec.heartbeat_s):
            try:
                self.study.heartbeat(self.claim)
            except UpdateFinishedTrialError:
                self.lost.set()
                return
            except Exception as exc:  # a storage hiccup (database restart, NFS): keep trying
                log(
                    self.worker, f"heartbeat of trial {self.claim.number} failed: {type(exc).__name__}: {exc}"
                )

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class TrialReporter:
    """Reports the objective to the Optuna trial every epoch; raises Pruned when the pruner says so
    and LeaseLost when the trial is no longer this worker's."""

    def __init__(self, claim: Claim, metric: str, lease: Lease) -> None:
        self.claim, self.metric, self.lease = claim, metric, lease

    def report(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.lease.lost.is_set():
            raise LeaseLost(f"trial {self.claim.number} was declared lost; its retry carries on")
        value = metrics.get(self.metric)
        if value is None:  # not evaluated this epoch (trainer.eval_every)
            return
        try:
            self.claim.trial.report(value, epoch)
            prune = self.claim.trial.should_prune()
        except UpdateFinishedTrialError as exc:
            raise LeaseLost(str(exc)) from exc
        if prune:
            raise Pruned(f"{self.metric}={value:.4g} at epoch {epoch}")


def objective_value(summary: dict[str, Any], metric: str) -> float | None:
    """The objective of a finished run: its last epoch's value, else the evaluated checkpoint's."""
    for section in ("final", "eval"):
        value = (summary.get(section) or {}).get(metric)
        if value is not None:
            return float(value)
    return None


def _tags(cfg: DictConfig, claim: Claim) -> list[str]:
    """The config's own tags and the trial's axis values / params, to filter runs by in wandb."""
    return [*cfg.logger.tags, *(f"{k}={v}" for k, v in claim.params.items())]


def _train(study: SweepStudy, claim: Claim, lease: Lease) -> dict[str, Any]:
    """Compose the trial's config and train it (resuming its run dir); returns the run summary."""
    spec = study.spec
    cfg = compose_experiment(spec.experiment, claim.overrides)
    # several workers share the CPU: one intra-op thread each unless the trial asks for more
    torch.set_num_threads(cfg.trainer.num_threads or 1)
    reporters: list[Any] = [ConsoleReporter(cfg.trainer.epochs)]
    wandb_reporter = None
    summary: dict[str, Any] = {}
    try:
        if cfg.logger.enabled:
            wandb_reporter = WandbReporter(
                cfg, claim.run_dir, group=spec.name, job_type=cfg.family, tags=_tags(cfg, claim)
            )
            reporters.append(wandb_reporter)
        reporters.append(TrialReporter(claim, spec.metric, lease))
        summary = run_experiment(cfg, claim.run_dir, Reporters(reporters))
    finally:
        if wandb_reporter is not None:
            wandb_reporter.finish(
                summary, exit_code=0 if summary.get("status") in ("completed", "pruned") else 1
            )
    return summary


def run_trial(study: SweepStudy, claim: Claim, worker: str) -> str:
    """Run one claimed trial to its end and record it; returns the state it ended in (or LOST)."""
    metric = study.spec.metric
    log(worker, f"trial {claim.number} (attempt {claim.attempt}) {claim.key}: {' '.join(claim.overrides)}")
    with Lease(study, claim, worker) as lease:
        try:
            summary = _train(study, claim, lease)
        except LeaseLost as exc:
            log(worker, f"trial {claim.number} abandoned: {exc}")
            return "LOST"
        except (KeyboardInterrupt, UncompletedJobError):
            # Ctrl-C, SIGTERM, or submitit's USR2 at a SLURM time limit / preemption: the trial goes
            # back to the queue at once and its retry resumes from the last checkpoint
            study.requeue(claim, f"worker interrupted (worker {worker})")
            raise
        except Exception as exc:  # a bad config, a diverged run...: a real failure, not retried
            study.finish(claim, TrialState.FAIL, reason=f"{type(exc).__name__}: {exc}")
            log(worker, f"trial {claim.number} failed: {type(exc).__name__}: {exc}")
            return TrialState.FAIL.name
    value = objective_value(summary, metric)
    state = TrialState.PRUNED if summary["status"] == "pruned" else TrialState.COMPLETE
    recorded = study.finish(claim, state, value if state == TrialState.COMPLETE else None)
    shown = "" if value is None or not math.isfinite(value) else f" {metric}={value:.4g}"
    log(
        worker,
        f"trial {claim.number} {state.name.lower()}{shown}" + ("" if recorded else " (not recorded: lost)"),
    )
    return state.name


def run_worker(sweep_dir: Path, worker: str) -> int:
    """Drain the sweep in `sweep_dir`; returns the number of trials this worker ran."""
    study = SweepStudy.open(Path(sweep_dir))
    torch.set_num_threads(1)
    importlib.import_module(
        "torch._dynamo"
    )  # the first optimiser imports it: 1-3 s better spent before a claim

    ran = 0
    while True:
        for trial in study.recover_stale():
            log(worker, f"trial {trial}: its worker is lost (no heartbeat); failed and re-enqueued")
        claim = study.claim(worker)
        if claim is not None:
            run_trial(study, claim, worker)
            ran += 1
            continue
        waiting, running = study.remaining_work()
        if waiting == 0 and running == 0:
            log(worker, f"sweep {study.spec.name} has no work left; ran {ran} trial(s)")
            return ran
        # others still run trials: stay, to take over any whose worker dies (or lost a claim race)
        time.sleep(min(study.spec.heartbeat_s, 1.0) if waiting == 0 else 0.1)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run trials of a sweep until none is left.")
    p.add_argument("sweep_dir", type=Path)
    p.add_argument(
        "--worker", default=f"{socket.gethostname()}-{os.getpid()}", help="name shown in the study"
    )
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a terminated worker gives its trial back at once
    try:
        run_worker(args.sweep_dir, args.worker)
    except KeyboardInterrupt as exc:
        log(args.worker, f"interrupted ({exc or 'Ctrl-C'})")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
