"""Sweeps with real local workers: scheduling overhead, claim-to-first-step latency, pruning's saving.

Run with `python -m benchmarks.bench_sweep` (about 5 minutes on 2 cores; `--quick`: parts 1-2 only,
about 1.5 minutes). Everything runs in a temporary results root (removed afterwards unless `--root`
names one to keep), with the sweep's default journal storage and workers submitted through submitit's
local executor, as `ablate sweep` does.

1. Overhead: a grid of identical tiny trainings drained by `--workers` workers. The sweep's wall time
   (submission to the last trial finished) against the ideal sum(trial training times) / workers, and
   where the difference goes (worker start-up, per-trial setup, recording, claiming, idle at the end).
2. Claim to first optimiser step, per trial (the lease's `claimed_at` -> summary.json `first_step_at`),
   with an in-process breakdown of the setup (compose, data generation, model build).
3. Pruning: the shipped `progress_search` sweep with its median pruner and with `pruner=none` at the
   same trial count; epochs spent, pruned trials and best objective of each. Both sweeps have the same
   name, so the trials' sampler seeds (and the random start-up draws) are the same.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
import torch
import yaml
from optuna.trial import FrozenTrial, TrialState

from core.provenance import provenance
from core.train.progress import build_model, load_videos
from core.train.run import build_task
from launchers.config import compose_experiment
from launchers.sweeps.local import submit_local_workers
from launchers.sweeps.spec import load_sweep
from sweepstate.spec import SweepSpec
from sweepstate.study import SweepStudy, lease_of

REPO = Path(__file__).resolve().parents[1]
# identical tiny trainings, one intra-op thread each so that 2 workers fill 2 cores without contention
FIXED_EXPERIMENT = "progress_none"
FIXED_OVERRIDES = ["debug=fast", "logger.enabled=false", "trainer.num_threads=1"]  # + trainer.epochs
OVERHEAD_TARGET = 1.15  # sweep wall / ideal
FIRST_STEP_TARGET_S = 3.0  # claim -> first optimiser step
SEARCH_SWEEP = "progress_search"
NO_PRUNING = ["search.pruner.name=none", "search.pruner.options=null"]  # the file's median options


@dataclass(frozen=True)
class TrialTiming:
    """One finished trial on the wall clock (epoch seconds) and what its run spent."""

    number: int
    worker: str
    state: str
    claimed_at: float
    run_start: float  # run_experiment's t0: config composed, data built, run dir written
    first_step_at: float | None
    train_s: float  # summary.json wall_time_s: t0 -> summary written
    completed_at: float  # Optuna's datetime_complete: the outcome is in the storage
    epochs: int
    value: float | None  # the objective, COMPLETE trials only


@dataclass(frozen=True)
class SweepRun:
    spec: SweepSpec
    submitted_at: float
    workers_done_at: float  # every worker process has returned (includes lingering)
    trials: list[TrialTiming]
    failures: list[str]

    @property
    def finished_at(self) -> float:
        return max(t.completed_at for t in self.trials)

    @property
    def wall_s(self) -> float:
        return self.finished_at - self.submitted_at


def _timing(trial: FrozenTrial, run_dir: Path, summary: dict[str, Any]) -> TrialTiming:
    # summary.json is written right after wall_time_s is taken: its mtime - wall_time_s is the run's t0
    written = (run_dir / "summary.json").stat().st_mtime
    return TrialTiming(
        number=trial.number,
        worker=lease_of(trial)["worker"],
        state=trial.state.name,
        claimed_at=float(lease_of(trial)["claimed_at"]),
        run_start=written - summary["wall_time_s"],
        first_step_at=summary.get("first_step_at"),
        train_s=float(summary["wall_time_s"]),
        completed_at=trial.datetime_complete.timestamp(),
        epochs=int(summary.get("epochs_run", 0)),
        value=trial.value if trial.state == TrialState.COMPLETE else None,
    )


def collect(study: SweepStudy) -> tuple[list[TrialTiming], list[str]]:
    """Timings of the finished trials, and a line per failed trial."""
    timings, failures = [], []
    for t in study.storage.get_all_trials(study.study_id, deepcopy=False):
        if t.state == TrialState.FAIL:
            failures.append(f"trial {t.number}: {t.user_attrs.get('fail_reason')}")
            continue
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            failures.append(f"trial {t.number}: left {t.state.name}")
            continue
        run_dir = study.sweep_dir / "trials" / t.user_attrs["trial_key"]
        summary = json.loads((run_dir / "summary.json").read_text())
        timings.append(_timing(t, run_dir, summary))
    return timings, failures


def run_sweep(spec: SweepSpec, root: Path, workers: int) -> SweepRun:
    """Create the sweep under `root`, drain it with `workers` local workers and wait for them."""
    study = SweepStudy.create(spec, root)
    if study.remaining_work() != (spec.budget, 0):
        raise SystemExit(f"{study.sweep_dir} holds a sweep that already ran: give an empty --root")
    submitted_at = time.time()
    jobs = submit_local_workers(study.sweep_dir, workers)
    try:
        ran = [job.result() for job in jobs]  # raises if a worker process crashed
    except BaseException:
        for job in jobs:  # do not leave detached workers behind
            job.cancel(check=False)
        raise
    workers_done_at = time.time()
    trials, failures = collect(study)
    if sum(ran) != len(trials) + len(failures):
        failures.append(f"workers ran {sum(ran)} trials, the storage holds {len(trials) + len(failures)}")
    if not trials:
        raise RuntimeError(f"sweep {spec.name}: no trial finished: {failures}")
    return SweepRun(spec, submitted_at, workers_done_at, sorted(trials, key=lambda t: t.claimed_at), failures)


# ---------------------------------------------------------------------------- part 1: overhead
def fixed_work_sweep(directory: Path, n_trials: int, epochs: int, workers: int) -> Path:
    """A grid sweep file of `n_trials` identical tiny trainings (one axis value x n_trials seeds)."""
    path = directory / "bench_fixed.yaml"
    sweep = {
        "experiment": FIXED_EXPERIMENT,
        "overrides": [*FIXED_OVERRIDES, f"trainer.epochs={epochs}"],
        "objective": {"metric": "val/ogpe_action", "direction": "minimize"},
        "seeds": list(range(n_trials)),
        "grid": {"trainer.weight_decay": [0.0]},  # a no-op axis: every trial does the same work
        "workers": workers,
    }
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


OVERHEAD_PARTS = (
    "worker start-up",
    "setup (claim->run start)",
    "training (wall_time_s)",
    "record (->COMPLETE)",
    "next claim",
    "idle at the end",
)


def overhead_breakdown(run: SweepRun, workers: int) -> dict[str, float]:
    """The sweep's worker-seconds (workers x wall) split so that the parts add up exactly; each part
    is divided by `workers`, i.e. shown as seconds of sweep wall time."""
    per_worker: dict[str, list[TrialTiming]] = defaultdict(list)
    for t in run.trials:
        per_worker[t.worker].append(t)
    parts = dict.fromkeys(OVERHEAD_PARTS, 0.0)
    for trials in per_worker.values():
        parts["worker start-up"] += trials[0].claimed_at - run.submitted_at
        for t, nxt in zip(trials, [*trials[1:], None], strict=True):
            parts["setup (claim->run start)"] += t.run_start - t.claimed_at
            parts["training (wall_time_s)"] += t.train_s
            parts["record (->COMPLETE)"] += t.completed_at - (t.run_start + t.train_s)
            if nxt is not None:
                parts["next claim"] += nxt.claimed_at - t.completed_at
        parts["idle at the end"] += run.finished_at - trials[-1].completed_at
    # a worker that never claimed a trial idled for the whole sweep
    parts["idle at the end"] += (workers - len(per_worker)) * run.wall_s
    return {k: v / workers for k, v in parts.items()}


def startup_costs(folder: Path, workers: int) -> dict[str, float]:
    """Seconds of a worker's start-up before it can claim: submitit's two interpreters (controller and
    job) up to the job function, and importing the worker module in fresh interpreters, alone and
    `workers` at once (as the sweep's workers start together)."""
    executor = submitit.AutoExecutor(folder=folder, cluster="local")
    submitted = time.time()
    entered = executor.submit(time.time).result()  # a job that only reads the clock: no imports
    out = {"submitit spawn -> job function": entered - submitted}
    probe = (
        "import time; t = time.perf_counter(); import launchers.sweeps.worker; print(time.perf_counter() - t)"
    )
    for n in (1, workers):
        procs = [
            subprocess.Popen([sys.executable, "-c", probe], cwd=REPO, stdout=subprocess.PIPE, text=True)
            for _ in range(n)
        ]
        out[f"import worker module, {n} at once"] = statistics.mean(float(p.communicate()[0]) for p in procs)
    return out


def overhead_model(parts: dict[str, float], run: SweepRun, workers: int) -> tuple[float, float]:
    """(fixed s of wall per sweep, s of worker time per trial) from the breakdown: what a sweep costs
    beyond its training, whatever the trials' length."""
    per_trial = sum(parts[k] for k in ("setup (claim->run start)", "record (->COMPLETE)", "next claim"))
    per_trial *= workers / len(run.trials)
    return parts["worker start-up"] + parts["idle at the end"], per_trial


# ---------------------------------------------------------------------------- part 2: first step
def setup_costs(overrides: list[str]) -> dict[str, float]:
    """Seconds of each setup stage of one trial in this process: the first call (as in a worker's first
    trial: Hydra initialised, torch._dynamo imported by the first optimiser) and a warm one (later trials)."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for when in ("first", "warm"):
            t = time.perf_counter()
            cfg = compose_experiment(FIXED_EXPERIMENT, [*overrides, "seed=0"])
            out[f"compose ({when})"] = time.perf_counter() - t
            t = time.perf_counter()
            videos = load_videos(cfg.data)
            out[f"data generation ({when})"] = time.perf_counter() - t
            t = time.perf_counter()
            build_model(cfg, videos[0].features.shape[1], len({v.task for v in videos}))
            out[f"model build ({when})"] = time.perf_counter() - t
            t = time.perf_counter()
            task = build_task(cfg, Path(tmp) / when)  # data + splits + model + evaluator
            out[f"build_task, all of it ({when})"] = time.perf_counter() - t
            t = time.perf_counter()
            provenance(FIXED_EXPERIMENT, overrides)
            out[f"run metadata: code hash, git diff, versions ({when})"] = time.perf_counter() - t
            t = time.perf_counter()
            torch.optim.Adam(task.model.parameters())
            out[f"optimiser construction ({when})"] = time.perf_counter() - t
    return out


def first_step_latency(run: SweepRun) -> dict[str, list[float]]:
    """Per trial: claim -> first step, and its two halves around run_experiment's start."""
    firsts: dict[str, int] = {}
    for t in run.trials:  # in claim order
        firsts.setdefault(t.worker, t.number)
    out: dict[str, list[float]] = defaultdict(list)
    for t in run.trials:
        if t.first_step_at is None:
            continue
        which = "first trial of a worker" if t.number in firsts.values() else "later trials"
        out[f"claim->first step, {which}"].append(t.first_step_at - t.claimed_at)
        out["claim->first step"].append(t.first_step_at - t.claimed_at)
        out["  claim->run start (compose, build_task, run dir)"].append(t.run_start - t.claimed_at)
        out["  run start->first step (trainer, resume, batch 1)"].append(t.first_step_at - t.run_start)
    return out


# ---------------------------------------------------------------------------- part 3: pruning
def search_summary(run: SweepRun) -> dict[str, Any]:
    values = [t.value for t in run.trials if t.state == "COMPLETE" and t.value is not None]
    best = (min if run.spec.direction == "minimize" else max)(values) if values else None
    return {
        "trials": len(run.trials) + len(run.failures),
        "pruned": sum(t.state == "PRUNED" for t in run.trials),
        "failed": len(run.failures),
        "epochs": sum(t.epochs for t in run.trials),
        "train_s": sum(t.train_s for t in run.trials),
        "wall_s": run.wall_s,
        "best": best,
    }


# ---------------------------------------------------------------------------- driver
@contextmanager
def results_root(keep: str | None):
    """A results root for the benchmark's sweeps: `keep` if given, else a temporary one removed after."""
    old = os.environ.get("ABLATE_ROOT")
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmp:
        root = Path(keep) if keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        os.environ["ABLATE_ROOT"] = str(root)  # workers inherit it
        try:
            yield root
        finally:
            if old is None:
                os.environ.pop("ABLATE_ROOT", None)
            else:
                os.environ["ABLATE_ROOT"] = old


def _stats(xs: list[float]) -> str:
    return f"mean {statistics.mean(xs):6.2f}  max {max(xs):6.2f}  (n={len(xs)})"


Row = tuple[str, str, str]  # measure, value, target


def part_overhead(root: Path, args: argparse.Namespace) -> tuple[SweepRun, list[Row]]:
    print(
        f"\n== 1. overhead: {args.fixed_trials} identical trials of {args.fixed_epochs} epochs, "
        f"{args.workers} workers ==",
        flush=True,
    )
    spec = load_sweep(fixed_work_sweep(root, args.fixed_trials, args.fixed_epochs, args.workers))
    run = run_sweep(spec, root / "overhead", args.workers)
    ideal = sum(t.train_s for t in run.trials) / args.workers
    lingered = run.workers_done_at - run.finished_at
    print(f"per-trial training time (wall_time_s): {_stats([t.train_s for t in run.trials])} s")
    print(f"sweep wall {run.wall_s:.1f} s (submission -> last trial recorded), ideal {ideal:.1f} s")
    print(f"workers returned {lingered:.1f} s after the last trial (lingering + submitit's 1 s poll)")
    print("where the wall time goes (worker-seconds / workers, adds up to the sweep wall):")
    parts = overhead_breakdown(run, args.workers)
    for name, secs in parts.items():
        print(f"  {name:<28} {secs:7.2f}")
    print("worker start-up, measured alone (s):")
    for name, secs in startup_costs(root / "probe", args.workers).items():
        print(f"  {name:<32} {secs:6.2f}")
    fixed, per_trial = overhead_model(parts, run, args.workers)
    per_worker = len(run.trials) / args.workers
    needed = (fixed / per_worker + per_trial) / (OVERHEAD_TARGET - 1)
    print(
        f"overhead model: {fixed:.1f} s per sweep (start-up, imbalance) + {per_trial:.2f} s per trial; "
        f"at {per_worker:.0f} trials per worker the target holds for trials of >= {needed:.1f} s"
    )
    for f in run.failures:
        print(f"  FAILED {f}")
    return run, [
        ("overhead: sweep wall / ideal", f"{run.wall_s / ideal:.3f}", f"<= {OVERHEAD_TARGET}"),
        ("overhead: per sweep / per trial (s)", f"{fixed:.1f} / {per_trial:.2f}", "-"),
        ("overhead: trial length for target (s)", f"{needed:.1f}", "-"),
        ("overhead: workers return after last trial (s)", f"{lingered:.1f}", "-"),
    ]


def part_first_step(run: SweepRun, costs: dict[str, float]) -> list[Row]:
    print("\n== 2. claim -> first optimiser step ==")
    latency = first_step_latency(run)
    for name, xs in latency.items():
        print(f"  {name:<52} {_stats(xs)} s")
    print("  setup stages in one process (seconds):")
    for name, secs in costs.items():
        print(f"    {name:<38} {secs:6.3f}")
    first = latency["claim->first step"]
    return [
        ("claim->first step mean (s)", f"{statistics.mean(first):.2f}", f"< {FIRST_STEP_TARGET_S}"),
        ("claim->first step max (s)", f"{max(first):.2f}", f"< {FIRST_STEP_TARGET_S}"),
    ]


def part_pruning(root: Path, args: argparse.Namespace) -> list[Row]:
    print(f"\n== 3. pruning on {SEARCH_SWEEP}: {args.trials} trials, {args.workers} workers ==", flush=True)
    results = {}
    for label, extra in (("median pruner", []), ("no pruner", NO_PRUNING)):
        spec = load_sweep(SEARCH_SWEEP, [f"search.n_trials={args.trials}", *extra])
        run = run_sweep(spec, root / label.replace(" ", "_"), args.workers)
        results[label] = r = search_summary(run)
        print(
            f"  {label:<14} epochs {r['epochs']:4d}  pruned {r['pruned']:2d}/{r['trials']}  "
            f"failed {r['failed']}  training {r['train_s']:6.1f} s  wall {r['wall_s']:6.1f} s  "
            f"best {spec.metric} {_value(r['best'])}",
            flush=True,
        )
        for f in run.failures:
            print(f"    FAILED {f}")
    pruned, full = results["median pruner"], results["no pruner"]
    return [
        ("pruning: epochs (median / none)", f"{pruned['epochs']} / {full['epochs']}", "-"),
        ("pruning: epochs saved", f"{1 - pruned['epochs'] / full['epochs']:.0%}", "> 0"),
        ("pruning: PRUNED trials", f"{pruned['pruned']} / {pruned['trials']}", "-"),
        ("pruning: wall s (median / none)", f"{pruned['wall_s']:.0f} / {full['wall_s']:.0f}", "-"),
        (
            "pruning: best objective (median / none)",
            f"{_value(pruned['best'])} / {_value(full['best'])}",
            "-",
        ),
    ]


def _value(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="parts 1-2 only (no pruning comparison)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--fixed-trials", type=int, default=16, help="trials of the overhead sweep")
    p.add_argument("--fixed-epochs", type=int, default=2, help="epochs of each overhead-sweep trial")
    p.add_argument("--trials", type=int, default=12, help=f"search.n_trials of each {SEARCH_SWEEP} run")
    p.add_argument("--root", help="keep the sweeps in this results root instead of a temporary one")
    args = p.parse_args(argv)
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    print(f"{cpus} CPUs, torch {torch.__version__}, 1-min load average {load:.2f} before start")
    if load > cpus / 2:
        print("warning: the machine is busy; wall times below include other processes' work")

    costs = setup_costs(FIXED_OVERRIDES)  # first: Hydra and torch._dynamo are not loaded yet in this process
    with results_root(args.root) as root:
        run, table = part_overhead(root, args)
        table += part_first_step(run, costs)
        if not args.quick:
            table += part_pruning(root, args)

    width = max(len(r[0]) for r in table)
    print(f"\n{'measure':<{width}}  {'value':>17}  target")
    for name, value, target in table:
        print(f"{name:<{width}}  {value:>17}  {target}")


if __name__ == "__main__":
    main()
