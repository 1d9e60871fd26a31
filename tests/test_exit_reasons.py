"""Why a worker's SLURM job ended: sacct's State + ExitCode -> an exit reason, recorded on a lost trial
and summed per job array by `ablate status`. The real-cluster counterpart is in tests/test_slurm.py."""

import time

import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from launchers.sweeps import slurm
from launchers.sweeps.slurm import JobState, exit_reason, job_outcome
from launchers.sweeps.status import SweepJobs
from sweepstate.study import LEASE_ATTR, lease_of
from sweepstate.study import lost_reason as sweep_lost_reason


@pytest.mark.parametrize(
    ("state", "exit_code", "reason"),
    [
        ("COMPLETED", "0:0", "completed"),
        ("COMPLETED", "1:0", "crash"),  # never written by Slurm; not taken for a success
        ("PREEMPTED", "0:15", "preempted"),
        ("TIMEOUT", "0:15", "timeout"),
        ("TIMEOUT", "0:0", "timeout"),
        ("DEADLINE", "0:0", "timeout"),
        ("OUT_OF_MEMORY", "0:125", "out-of-memory"),
        ("FAILED", "137:0", "out-of-memory"),  # a shell's exit code for a child killed by SIGKILL
        ("FAILED", "9:0", "out-of-memory"),  # how this Slurm records a SIGKILLed batch step
        ("FAILED", "0:9", "out-of-memory"),  # killed by signal 9 itself
        ("FAILED", "1:0", "crash"),
        ("FAILED", "2:0", "crash"),
        ("FAILED", "0:11", "crash"),  # segfault
        ("FAILED", "", "crash"),
        ("NODE_FAIL", "0:0", "node-failure"),
        ("BOOT_FAIL", "0:0", "node-failure"),
        ("CANCELLED", "0:15", "cancelled"),
        ("CANCELLED by 1000", "0:0", "cancelled"),
        ("cancelled by 0", "0:9", "cancelled"),  # Slurm's own kill: not out-of-memory
        ("REVOKED", "0:0", "cancelled"),
        ("REQUEUED", "0:0", "requeued"),
        ("REQUEUE_HOLD", "0:0", "requeued"),
        ("PENDING", "0:0", ""),
        ("RUNNING", "0:0", ""),
        ("COMPLETING", "0:0", ""),
        ("SUSPENDED", "0:0", ""),
        ("SOMETHING_NEW", "0:0", "unknown"),
    ],
)
def test_exit_reason(state, exit_code, reason):
    assert exit_reason(state, exit_code) == reason


def job(job_id="123_4", state="TIMEOUT", exit_code="0:15", reason="", start=None) -> JobState:
    return JobState(job_id=job_id, state=state, exit_code=exit_code, reason=reason, start=start)


def test_job_phase_and_description():
    assert job().phase == "failed" and job().describe() == "slurm job 123_4 TIMEOUT (exit 0:15)"
    assert job(state="COMPLETED", exit_code="0:0").phase == "completed"
    pending = job(state="PENDING", exit_code="", reason="Priority")
    assert pending.phase == "pending" and pending.describe() == "slurm job 123_4 PENDING (Priority)"
    assert job(state="REQUEUED").phase == "pending"  # it runs again
    # sacct keeps the last pending reason of an ended job: not shown as why it ended
    assert job(state="CANCELLED", exit_code="0:0", reason="Priority").describe() == (
        "slurm job 123_4 CANCELLED (exit 0:0)"
    )
    assert job(state="RUNNING", exit_code="").phase == "running"
    assert job(state="RUNNING", exit_code="").describe() == "slurm job 123_4 RUNNING"


def running_trial(**lease) -> object:
    return create_trial(
        state=TrialState.RUNNING,
        params={"trainer.lr": 0.001},
        distributions={"trainer.lr": FloatDistribution(1e-4, 1e-2)},
        system_attrs={LEASE_ATTR: {"worker": "w7", **lease}},
    )


def lost_reason(trial, age: float, jobs: dict[str, JobState]) -> tuple[str, dict]:
    """The queue's lost_reason with SLURM's job outcome injected, as the launchers inject it."""
    return sweep_lost_reason(trial, age, job_outcome(lease_of(trial), jobs))


def test_lost_reason_says_why_the_trial_job_ended():
    claimed = time.time() - 100
    trial = running_trial(slurm_job="123_4", claimed_at=claimed)
    reason, attrs = lost_reason(trial, 31.4, {"123_4": job()})
    assert reason == "worker lost: no heartbeat for 31 s (worker w7): slurm job 123_4 TIMEOUT (exit 0:15)"
    assert attrs == {"exit_reason": "timeout"}
    oom = job(state="FAILED", exit_code="137:0")
    assert lost_reason(trial, 40, {"123_4": oom})[1] == {"exit_reason": "out-of-memory"}
    # running again since after the claim: the job was requeued and the trial's run is gone
    again = job(state="RUNNING", exit_code="", start=claimed + 50)
    reason, attrs = lost_reason(trial, 40, {"123_4": again})
    assert reason.endswith("slurm job 123_4 RUNNING again after a requeue") and attrs == {
        "exit_reason": "requeued"
    }
    # running since before the claim: the worker stalled, or Slurm has not noticed; no reason yet
    still = job(state="RUNNING", exit_code="", start=claimed - 5)
    assert lost_reason(trial, 40, {"123_4": still}) == (
        "worker lost: no heartbeat for 40 s (worker w7): slurm job 123_4 RUNNING",
        {},
    )
    # sacct missing or lagging: the job id still helps
    reason, attrs = lost_reason(trial, 40, {})
    assert reason.endswith("(worker w7): slurm job 123_4 (state unknown: no sacct, or it lags)") and not attrs
    # a local worker: as before
    assert lost_reason(running_trial(), 40, {}) == ("worker lost: no heartbeat for 40 s (worker w7)", {})


def test_array_summary_counts_jobs_by_phase_and_failures_by_reason():
    records = [
        {"job_id": f"77_{i}", "worker": f"slurm-x-{i}", "launcher": "slurm", "submitted": "x"}
        for i in range(6)
    ]
    records += [
        {"job_id": "80", "worker": "slurm-y-0", "launcher": "slurm", "submitted": "y"},
        {"job_id": "4242", "worker": "local-z-0", "launcher": "local", "submitted": "z"},
    ]
    states = {
        "77_0": job("77_0", "COMPLETED", "0:0"),
        "77_1": job("77_1", "TIMEOUT", "0:0"),
        "77_2": job("77_2", "CANCELLED", "0:15"),
        "77_3": job("77_3", "RUNNING", ""),
        "77_4": job("77_4", "PENDING", "", reason="JobArrayTaskLimit"),
        "80": job("80", "FAILED", "1:0"),
    }
    first, second = SweepJobs(records, states).arrays()
    assert first == {
        "array": "77",
        "jobs": 6,
        "pending": 1,
        "running": 1,
        "completed": 1,
        "failed": 2,
        "unknown": 1,  # 77_5: neither squeue nor sacct knows it
        "failed_by_reason": {"timeout": 1, "cancelled": 1},
        "job_states": {
            "77_0": "COMPLETED",
            "77_1": "TIMEOUT",
            "77_2": "CANCELLED",
            "77_3": "RUNNING",
            "77_4": "PENDING",
            "77_5": None,
        },
    }
    assert second["array"] == "80" and second["failed_by_reason"] == {"crash": 1}


def test_job_queries_without_slurm_know_nothing_and_do_not_fail(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue, no sacct
    assert slurm.job_states(["123_4", "99"]) == {} and slurm.sacct_states(["123_4"]) == {}
    assert slurm.job_states([]) == {}


def test_current_job_id_names_array_tasks_as_squeue_does(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    assert slurm.current_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "130")
    assert slurm.current_job_id() == "130"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "126")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    assert slurm.current_job_id() == "126_4"
