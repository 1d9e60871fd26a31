"""Sweep workers interrupted by SLURM itself, on a real one-node cluster (`bash tests/slurm/start_slurm.sh`):
a requeued or cancelled worker job loses its trial, the lease recovers it under the same key and the
retry resumes from the trial's checkpoint, ending where an uninterrupted run ends.

Slurm stops a job with SIGTERM, then SIGKILL after the cluster's KillWait; submitit ignores SIGTERM, so a
worker keeps training until the SIGKILL. Trials are made long enough to outlast KillWait.
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
from launchers.sweeps.spec import load_sweep, trial_key
from launchers.sweeps.study import SweepStudy, TrialRecord
from tests.test_slurm import _sacct, cluster  # noqa: F401 - `cluster` is a fixture used by name

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


def kill_wait_s() -> int:
    """Seconds Slurm waits between SIGTERM and SIGKILL when it stops a job."""
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"^KillWait\s*=\s*(\d+)", out, re.MULTILINE)
    assert m is not None, "scontrol show config has no KillWait"
    return int(m[1])


def make_study(tmp_path: Path, name: str, workers: int) -> SweepStudy:
    """One trial that outlasts KillWait (so the SIGKILL lands mid-trial), with a short lease."""
    epochs = 2 * kill_wait_s() + 20
    body = {
        "experiment": "progress_none",
        "overrides": [*TINY, f"trainer.epochs={epochs}"],
        "objective": {"metric": "val/ogpe_action", "direction": "minimize"},
        "seeds": [0],
        "grid": {"trainer.lr": [0.001]},
        "workers": workers,
        "lease": {"heartbeat_s": 1, "timeout_s": 5, "max_retries": 1},
        "launcher": {"name": "slurm", "slurm": {"time": "00:10:00", "cpus_per_task": 1, "mem": "2G"}},
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


def assert_recovered(study: SweepStudy, worker: str) -> TrialRecord:
    """One trial lost by `worker` (FAIL, 'worker lost') and one retry under the same key that resumed
    from the checkpoint and completed; returns the retry."""
    trials = study.trials()
    assert [t.state for t in trials] == ["FAIL", "COMPLETE"], trials
    lost, retry = trials
    assert lost.worker == worker and lost.attempt == 1
    assert lost.reason.startswith("worker lost: no heartbeat for") and worker in lost.reason, lost.reason
    assert retry.key == lost.key == trial_key(study.spec.name, {"trainer.lr": "0.001"}, 0)
    assert retry.attempt == 2 and retry.run_dir == lost.run_dir
    summary = json.loads((retry.run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_epoch"] >= 1, summary
    assert retry.value == pytest.approx(summary["final"]["val/ogpe_action"])
    return retry


def test_requeued_worker_job_resumes_its_trial_exactly(tmp_path):
    study = make_study(tmp_path, "requeue", workers=1)
    (job,) = submit(study, 1)
    trial = wait_for_checkpoint(study, [job])
    subprocess.run(["scontrol", "requeue", job.job_id], check=True, capture_output=True)
    # the reference trains while Slurm stops the job, holds it back and starts it again
    expected = uninterrupted_rows(study, trial.params, trial.seed, tmp_path / "reference")
    assert job.result() == 1  # the restarted worker found its own trial lost, re-ran it and left
    (worker,) = [r["worker"] for r in submitted_jobs(study.sweep_dir)]
    retry = assert_recovered(study, worker)
    assert metric_rows(retry.run_dir) == expected
    assert _sacct(job.job_id)[job.job_id][0] == "COMPLETED"  # waits out sacct's lag
    states = subprocess.run(
        ["sacct", "-D", "-X", "-n", "-P", "-j", job.job_id, "-o", "State"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert states == ["REQUEUED", "COMPLETED"], states


def test_cancelled_worker_job_trial_is_recovered_by_the_other_worker(tmp_path):
    study = make_study(tmp_path, "cancel", workers=2)
    jobs = submit(study, 2)
    trial = wait_for_checkpoint(study, jobs)
    job_of = {r["worker"]: j for r, j in zip(submitted_jobs(study.sweep_dir), jobs, strict=True)}
    victim = job_of.pop(trial.worker)
    ((survivor_name, survivor),) = job_of.items()
    wait_for_state(survivor, "RUNNING")  # alive: it lingers while another worker's trial runs
    subprocess.run(["scancel", victim.job_id], check=True, capture_output=True)
    expected = uninterrupted_rows(study, trial.params, trial.seed, tmp_path / "reference")
    assert survivor.result() == 1
    retry = assert_recovered(study, trial.worker)
    assert retry.worker == survivor_name
    assert metric_rows(retry.run_dir) == expected
    wait_for_state(victim, "CANCELLED")  # submitit reads sacct: "CANCELLED by <uid>"
