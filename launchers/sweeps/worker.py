"""A sweep worker: claim a trial, train it (resuming its run dir), record the outcome, repeat.

Any number of workers, on any hosts that share the sweep dir (and the storage), drain one sweep.
A worker leaves when nothing is waiting and no other worker still runs a trial: while others run, it
lingers, so that a trial whose worker died is recovered (after the lease timeout) and re-run here.

A stop signal (submitit's USR2 before a SLURM time limit or at preemption, SIGTERM) stops the running
trial after its current batch with a mid-epoch checkpoint and gives it back to the queue (same key,
run dir and wandb run); a job stopped at a time limit or preempted is then requeued and drains on.

    python -m launchers.sweeps.worker SWEEP_DIR --worker NAME
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

import submitit
import torch
from omegaconf import DictConfig
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from core.train.distributed import DistContext, broadcast_message, context_from_env, init_process_group
from core.train.loop import Interrupted, Pruned
from core.train.run import run_experiment
from core.train.signals import ctrl_c_interrupts, stop_on_signals, stop_requested
from launchers.config import compose_experiment
from launchers.snapshot import TRIAL_CODE_ATTR, running_code
from launchers.sweeps.slurm import current_job_id, trial_job_outcomes
from launchers.tracking import ConsoleReporter, Reporters, WandbReporter
from sweepstate.storage import StorageUnavailable
from sweepstate.study import Claim, SweepStudy


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
        self.storage_down: StorageUnavailable | None = None  # the heartbeat's retries ran out
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{claim.number}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.study.spec.heartbeat_s):
            try:
                self.study.heartbeat(self.claim)
            except UpdateFinishedTrialError:
                self.lost.set()
                return
            except StorageUnavailable as exc:  # transient errors retried for the lease timeout
                self.storage_down = exc
                return
            except Exception as exc:  # anything else: keep trying
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
        if self.lease.storage_down is not None:
            raise self.lease.storage_down
        if self.lease.lost.is_set():
            raise LeaseLost(f"trial {self.claim.number} was declared lost; its retry carries on")
        value = metrics.get(self.metric)
        if value is None:  # not evaluated this epoch (trainer.eval_every)
            return
        try:
            prune = self.lease.study.report(self.claim, value, epoch)
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


def trial_threads(cfg: DictConfig) -> int:
    """torch intra-op threads for a trial: the config's trainer.num_threads, else the CPUs SLURM gave
    this task (torch would take every core of a node that other tasks share), else 1 (local workers
    share the machine's cores)."""
    return int(cfg.trainer.num_threads or os.environ.get("SLURM_CPUS_PER_TASK") or 1)


def _train(study: SweepStudy, claim: Claim, lease: Lease) -> dict[str, Any]:
    """Compose the trial's config and train it (resuming its run dir); returns the run summary."""
    spec = study.spec
    cfg = compose_experiment(spec.experiment, claim.overrides)
    torch.set_num_threads(trial_threads(cfg))
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
        summary = run_experiment(cfg, claim.run_dir, Reporters(reporters), overrides=claim.overrides)
    finally:
        if wandb_reporter is not None:
            wandb_reporter.finish(
                summary, exit_code=0 if summary.get("status") in ("completed", "pruned") else 1
            )
    return summary


def run_trial(study: SweepStudy, claim: Claim, worker: str) -> str:
    """Run one claimed trial to its end and record it; returns the state it ended in (or LOST, or
    INTERRUPTED when a stop signal made it give the trial back)."""
    metric = study.spec.metric
    log(worker, f"trial {claim.number} (attempt {claim.attempt}) {claim.key}: {' '.join(claim.overrides)}")
    # the code this trial runs, for people reading the study (the dashboard); through storage hiccups
    study.set_user_attr(claim, TRIAL_CODE_ATTR, running_code())
    with Lease(study, claim, worker) as lease:
        try:
            summary = _train(study, claim, lease)
        except LeaseLost as exc:
            log(worker, f"trial {claim.number} abandoned: {exc}")
            return "LOST"
        except StorageUnavailable as exc:
            # give the trial back if the storage lets us (else its lease expires); the worker ends
            with contextlib.suppress(StorageUnavailable):
                study.requeue(claim, f"storage unavailable (worker {worker}): {exc}")
            raise
        except Interrupted as exc:
            # a stop signal (see run_worker): the trial saved a checkpoint, its retry resumes from it
            study.requeue(claim, f"interrupted: {exc} (worker {worker})")
            log(worker, f"trial {claim.number} given back: {exc}")
            return "INTERRUPTED"
        except KeyboardInterrupt:
            # Ctrl-C (submitit's local cancel sends SIGINT): the trial goes back to the queue at once and
            # its retry resumes from the last epoch checkpoint
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


# submitit's stop signal: sbatch's `--signal=USR2@signal_delay_s` before a time limit (and at preemption)
PREEMPT_SIGNAL = signal.Signals[f"SIG{submitit.JobEnvironment.USR_SIG}"]
STOP_SIGNALS = (PREEMPT_SIGNAL, signal.SIGTERM)


class WorkerStopped(Exception):
    """A stop signal ended this worker and its job is not requeued (a cancel, or no work for it)."""


def _slurm_job(job_id: str) -> dict[str, str]:
    """`scontrol show job` fields of `job_id` ({} when scontrol fails)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", out))


def job_after_stop(reason: str) -> str:
    """What should become of this worker's job after a stop by `reason`: "requeue" (submitit's signal,
    or SIGTERM at a SLURM time limit: the job should go on), "requeued" (SLURM requeues it itself:
    `scontrol requeue`, preemption in REQUEUE mode) or "end" (a cancel, a process outside submitit)."""
    executor, job_id = os.environ.get("SUBMITIT_EXECUTOR"), current_job_id()
    if executor == "slurm" and job_id is not None:
        # Slurm updates the job before it signals it: a requeue has already counted its restart; a
        # cancel and a time limit both read COMPLETING and differ by their reason
        job = _slurm_job(job_id)
        if int(job.get("Restarts") or 0) > int(os.environ.get("SLURM_RESTART_COUNT") or 0):
            return "requeued"
        return "requeue" if reason == PREEMPT_SIGNAL.name or job.get("Reason") == "TimeLimit" else "end"
    return "requeue" if executor is not None and reason == PREEMPT_SIGNAL.name else "end"


def _leave(study: SweepStudy, worker: str, reason: str, ran: int) -> NoReturn:
    """End this worker after a stop by `reason` (a trial it was running is already back in the queue).

    Its job is requeued when it should go on (`job_after_stop`), trials are waiting, and it ran one in
    this run: each run then makes progress, so unlike submitit's max_num_timeout there is no cap to
    end a long sweep early, and a time limit too short to reach a claim cannot requeue forever. The
    requeued job runs this worker again. Requeued, it exits without a result, as submitit does."""
    fate = job_after_stop(reason)
    waiting, _ = study.remaining_work()
    if fate == "requeue" and ran and waiting:
        env = submitit.JobEnvironment()
        log(worker, f"stopped by {reason}: requeueing job {env.job_id} for {waiting} waiting trial(s)")
        try:
            env._requeue(0)  # SLURM: scontrol requeue; local executor: exits with its requeue code
        except subprocess.SubprocessError as exc:
            raise WorkerStopped(f"stopped by {reason}; requeueing the job failed: {exc}") from exc
        fate = "requeued"
    if fate == "requeued":
        sys.exit(f"{worker}: stopped by {reason}; the job is requeued and will go on with the sweep")
    if fate == "end":
        why = "not at a time limit or preemption"
    elif not ran:
        why = "it ran no trial since it started (a time limit shorter than the signal delay?)"
    else:
        why = "no trial is waiting"
    raise WorkerStopped(f"stopped by {reason}; the job is not requeued: {why}")


def rank_context() -> DistContext:
    """This worker's ranks: a SLURM job with several tasks (launcher.slurm.tasks_per_node) trains each
    trial data parallel over them; the rank variables are exported as torch expects them."""
    if int(os.environ.get("SLURM_NTASKS") or 1) > 1 and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return context_from_env()


def run_worker(sweep_dir: Path, worker: str) -> int:
    """Drain the sweep in `sweep_dir`; returns the number of trials this worker ran.

    USR2 and SIGTERM stop it cleanly: the running trial checkpoints after its current batch and goes
    back to the queue, then `_leave` requeues the job or raises WorkerStopped. With several ranks, rank
    0 claims and records trials and the other ranks train each claimed trial with it."""
    ctx = rank_context()
    init_process_group(ctx)
    with stop_on_signals(STOP_SIGNALS):
        if ctx.enabled and not ctx.is_main:
            study = SweepStudy.open(Path(sweep_dir), job_outcomes=trial_job_outcomes)
            return _follow(study, f"{worker}-rank{ctx.rank}", ctx)
        return _drain(Path(sweep_dir), worker, ctx)


def _follow(study: SweepStudy, worker: str, ctx: DistContext) -> int:
    """A rank > 0: train every trial rank 0 announces (its overrides and run dir) until it says stop."""
    ran = 0
    while (message := broadcast_message(None, ctx)) is not None:
        overrides, run_dir = message
        cfg = compose_experiment(study.spec.experiment, overrides)
        torch.set_num_threads(trial_threads(cfg))
        # rank > 0 trains and writes nothing; stopped, every rank stops at the same batch and rank 0
        # gives the trial back
        with contextlib.suppress(Interrupted):
            run_experiment(cfg, Path(run_dir))
        ran += 1
    log(worker, f"rank {ctx.rank}: rank 0 has no more trials; trained {ran}")
    return ran


def _drain(sweep_dir: Path, worker: str, ctx: DistContext) -> int:
    study = SweepStudy.open(sweep_dir, job_outcomes=trial_job_outcomes)
    torch.set_num_threads(1)
    importlib.import_module(
        "torch._dynamo"
    )  # the first optimiser imports it: 1-3 s better spent before a claim

    def announce(message: tuple[list[str], str] | None) -> None:
        if ctx.enabled:
            broadcast_message(message, ctx)

    ran = 0
    while True:
        if (stop := stop_requested()) is not None:
            announce(None)
            _leave(study, worker, stop, ran)
        for trial in study.recover_stale_if_due():
            log(worker, f"trial {trial}: its worker is lost (no heartbeat); failed and re-enqueued")
        claim = study.claim(worker, slurm_job=current_job_id())
        if claim is not None:
            announce((list(claim.overrides), str(claim.run_dir)))
            run_trial(study, claim, worker)
            ran += 1
            continue
        waiting, running = study.remaining_work()
        if waiting == 0 and running == 0:
            log(worker, f"sweep {study.spec.name} has no work left; ran {ran} trial(s)")
            announce(None)
            return ran
        # others still run trials: stay, to take over any whose worker dies (or lost a claim race)
        time.sleep(min(study.spec.heartbeat_s, 1.0) if waiting == 0 else 0.1)


def main(argv: list[str] | None = None) -> int:
    ctrl_c_interrupts()
    p = argparse.ArgumentParser(description="Run trials of a sweep until none is left.")
    p.add_argument("sweep_dir", type=Path)
    p.add_argument(
        "--worker", default=f"{socket.gethostname()}-{os.getpid()}", help="name shown in the study"
    )
    args = p.parse_args(argv)
    try:
        run_worker(args.sweep_dir, args.worker)
    except (KeyboardInterrupt, WorkerStopped) as exc:
        log(args.worker, f"interrupted ({exc or 'Ctrl-C'})")
        return 130
    except StorageUnavailable as exc:
        log(
            args.worker,
            f"stopped: {exc}; its trial (if any) is back in the queue, or will be at its lease end",
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
