"""Sweep workers interrupted by SLURM itself, on a real one-node cluster (`bash tests/slurm/start_slurm.sh`):
a worker job that is requeued, cancelled or reaches its time limit checkpoints its trial after the
current batch and gives it back under the same key; the retry (in the requeued job, or another worker)
resumes from that mid-epoch checkpoint and ends exactly where an uninterrupted run ends.

Slurm stops a job with SIGTERM (a requeue, a cancel), then SIGKILL after the cluster's KillWait, and
sends submitit's USR2 `signal_delay_s` before a time limit (checked every ~30 s). Trials are made long
enough that the signal lands mid-trial.
Without a cluster these tests are skipped, except under CI (CI=true), where that is a failure.
"""

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import submitit
import yaml

from core.train.run import run_experiment
from launchers.config import compose_experiment
from launchers.sweeps import slurm
from launchers.sweeps.local import submitted_jobs
from launchers.sweeps.spec import load_sweep
from sweepstate.spec import trial_key
from sweepstate.study import SweepStudy, TrialRecord
from tests.test_slurm import cluster  # noqa: F401 - `cluster` is a fixture used by name

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("cluster")]

# ~0.5 s per epoch on one core: 6 videos per task, split 2/2/2
TINY = [
    "debug=fast",
    "logger.enabled=false",
    "trainer.num_threads=1",
    "data.generator.videos_per_task=6",
    "data.split_fractions=[0.34,0.33,0.33]",
]
POLL_S = 0.05


def make_study(
    tmp_path: Path, name: str, workers: int, overrides: tuple[str, ...], time_limit: str = "00:10:00"
) -> SweepStudy:
    """One trial of TINY with `overrides` (long enough for a signal to land mid-trial), a short lease."""
    replaced = {o.split("=")[0] for o in overrides}
    body = {
        "experiment": "progress_none",
        "overrides": [*(o for o in TINY if o.split("=")[0] not in replaced), *overrides],
        "objective": {"metric": "val/ogpe_action", "direction": "minimize"},
        "seeds": [0],
        "grid": {"trainer.lr": [0.001]},
        "workers": workers,
        "lease": {"heartbeat_s": 1, "timeout_s": 5, "max_retries": 1},
        "launcher": {"name": "slurm", "slurm": {"time": time_limit, "cpus_per_task": 1, "mem": "2G"}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return SweepStudy.create(load_sweep(path), tmp_path / "runs")


def submit(study: SweepStudy, n: int) -> list[submitit.Job]:
    return slurm.submit_slurm_workers(study.sweep_dir, n, slurm.slurm_resources(study.spec.launcher))


def wait_for_checkpoint(study: SweepStudy, jobs: list[submitit.Job], timeout: float = 60) -> TrialRecord:
    """The running trial, once its first epoch checkpoint exists."""
    deadline = time.monotonic() + timeout
    while True:
        running = [t for t in study.trials() if t.state == "RUNNING"]
        if running and (running[0].run_dir / "checkpoints" / "last.pt").exists():
            return running[0]
        assert time.monotonic() < deadline, f"no checkpoint after {timeout} s: {[j.state for j in jobs]}"
        time.sleep(POLL_S)


def wait_for_state(job: submitit.Job, state: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not (now := job.state).startswith(state):
        assert time.monotonic() < deadline, f"job {job.job_id} is {now}, not {state}, after {timeout} s"
        time.sleep(0.5)


def metric_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock column, which no two runs share."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]


def uninterrupted_rows(study: SweepStudy, params: dict, seed: int, run_dir: Path) -> list[dict]:
    """The same trial config trained inline, start to end."""
    cfg = compose_experiment(study.spec.experiment, study.spec.trial_overrides(params, seed))
    assert run_experiment(cfg, run_dir)["resumed_from_epoch"] is None
    return metric_rows(run_dir)


STOPPED = re.compile(r"interrupted: stopped by (SIG\w+) (?:after batch (\d+) of|before) epoch (\d+); saved ")


def assert_resumed(study: SweepStudy, worker: str, signal: str) -> TrialRecord:
    """The trial given back by `worker` (and by the requeued runs of its job) on `signal`, each time
    with a checkpoint, then completed under the same key from the last one; returns the completed
    attempt."""
    trials = study.trials()
    assert [t.state for t in trials][-1] == "COMPLETE" and {t.state for t in trials[:-1]} == {"FAIL"}, trials
    *stopped, retry = trials
    assert stopped[0].worker == worker
    for attempt, t in enumerate(stopped, start=1):
        m = STOPPED.match(t.reason)
        assert m is not None and m[1] == signal and worker in t.reason, t.reason
        assert t.attempt == attempt and t.key == retry.key and t.run_dir == retry.run_dir
    assert retry.key == trial_key(study.spec.name, {"trainer.lr": "0.001"}, 0)
    assert retry.attempt == len(stopped) + 1
    summary = json.loads((retry.run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    assert summary["resumed_from_epoch"] == int(m[3]), (summary["resumed_from_epoch"], t.reason)
    assert retry.value == pytest.approx(summary["final"]["val/ogpe_action"])
    return retry


def job_runs(job_id: str) -> list[str]:
    """The state of every run of one job, oldest first (-D: requeued runs too), once the last one ended
    (sacct lags behind the results)."""
    deadline = time.monotonic() + 30
    while True:
        out = subprocess.run(
            ["sacct", "-D", "-X", "-n", "-P", "-j", job_id, "-o", "State"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        states = [line.split()[0] for line in out.splitlines() if line]  # "CANCELLED by 0" -> CANCELLED
        ended = states and states[-1] not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING")
        if ended or time.monotonic() > deadline:
            return states
        time.sleep(1)


def test_requeued_worker_job_resumes_its_trial_exactly(tmp_path):
    study = make_study(tmp_path, "requeue", workers=1, overrides=("trainer.epochs=20",))
    (job,) = submit(study, 1)
    trial = wait_for_checkpoint(study, [job])
    subprocess.run(["scontrol", "requeue", job.job_id], check=True, capture_output=True)
    # the reference trains while Slurm stops the job, holds it back and starts it again
    expected = uninterrupted_rows(study, trial.params, trial.seed, tmp_path / "reference")
    assert job.result() == 1  # the restarted worker resumed the given-back trial and left
    (worker,) = [r["worker"] for r in submitted_jobs(study.sweep_dir)]
    retry = assert_resumed(study, worker, "SIGTERM")
    log = next((study.sweep_dir / "workers").glob("*_log.err")).read_text()
    assert "requeueing job" not in log, "Slurm requeued the job itself: the worker must not do it again"
    assert metric_rows(retry.run_dir) == expected
    assert job_runs(job.job_id) == ["REQUEUED", "COMPLETED"]


def test_worker_job_past_its_time_limit_checkpoints_requeues_itself_and_completes_its_trial(tmp_path):
    # ~55 s of training on an idle core (1.5 s epochs of 8 batches, validation OGPE only at the end)
    # against a 1-minute limit: USR2@10 arrives 20-50 s after each start (Slurm checks every 30 s), so
    # at least once mid-trial and 10 s before the kill at 60-90 s; on a loaded machine, more often
    long = ("data.generator.videos_per_task=24", "trainer.eval_every=1000", "trainer.epochs=36")
    study = make_study(tmp_path, "timelimit", workers=1, overrides=long, time_limit="00:01:00")
    resources = {**slurm.slurm_resources(study.spec.launcher), "slurm_signal_delay_s": 10}
    (job,) = slurm.submit_slurm_workers(study.sweep_dir, 1, resources)
    trial = wait_for_checkpoint(study, [job], timeout=120)
    expected = uninterrupted_rows(study, trial.params, trial.seed, tmp_path / "reference")
    assert job.result() == 1  # its last run resumed the trial, completed it and left
    (worker,) = [r["worker"] for r in submitted_jobs(study.sweep_dir)]
    retry = assert_resumed(study, worker, "SIGUSR2")
    assert metric_rows(retry.run_dir) == expected
    requeues = len(study.trials()) - 1
    assert job_runs(job.job_id) == ["REQUEUED"] * requeues + ["COMPLETED"]
    log = next((study.sweep_dir / "workers").glob("*_log.err")).read_text()
    assert log.count("requeueing job") == requeues and "DUE TO TIME LIMIT" not in log, log


def test_cancelled_worker_job_trial_is_recovered_by_the_other_worker(tmp_path):
    study = make_study(tmp_path, "cancel", workers=2, overrides=("trainer.epochs=20",))
    jobs = submit(study, 2)
    trial = wait_for_checkpoint(study, jobs)
    job_of = {r["worker"]: j for r, j in zip(submitted_jobs(study.sweep_dir), jobs, strict=True)}
    victim = job_of.pop(trial.worker)
    ((survivor_name, survivor),) = job_of.items()
    # the survivor lingers, or waits for a free CPU: either way it claims the given-back trial
    subprocess.run(["scancel", victim.job_id], check=True, capture_output=True)
    expected = uninterrupted_rows(study, trial.params, trial.seed, tmp_path / "reference")
    assert survivor.result() == 1
    retry = assert_resumed(study, trial.worker, "SIGTERM")
    assert retry.worker == survivor_name and retry.attempt == 2
    assert metric_rows(retry.run_dir) == expected
    wait_for_state(victim, "CANCELLED")  # submitit reads sacct: "CANCELLED by <uid>"
    assert job_runs(victim.job_id) == ["CANCELLED"], "a cancelled worker must not requeue itself"
