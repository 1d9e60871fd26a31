"""Sweep workers as SLURM job arrays, against a real one-node cluster (`bash tests/slurm/start_slurm.sh`).

Without a cluster the cluster tests are skipped, except under CI (CI=true), where that is a failure.
"""

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from datetime import datetime

import pytest
import submitit
import yaml
from optuna.trial import TrialState

from launchers.cli import main
from launchers.sweeps import slurm
from launchers.sweeps.local import submitted_jobs
from launchers.sweeps.spec import load_sweep, sweeps_dir
from sweepstate.study import SweepStudy, TrialRecord

SWEEP = """
experiment: progress_none
overrides: [debug=fast, trainer.epochs=1, logger.enabled=false, trainer.num_threads=1]
objective: {metric: val/ogpe_action, direction: minimize}
seeds: [0, 1]
grid:
  loss/alignment: [gtcc, tcc]
workers: 2
lease: {heartbeat_s: 1, timeout_s: 30, max_retries: 1}
launcher: {name: slurm, slurm: {time: "00:10:00", cpus_per_task: 1, mem: 2G}}
"""


def _sinfo_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="module")
def cluster():
    if not _sinfo_answers():
        reason = "no SLURM cluster answers `sinfo`; start one with: bash tests/slurm/start_slurm.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI must run the SLURM tests)")
        pytest.skip(reason)


def _sacct(array_id: str) -> dict[str, tuple[str, str, str]]:
    """Array task id -> (state, start, end) for one array job; waits out sacct's lag behind results."""
    deadline = time.time() + 30
    while True:
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", array_id, "-o", "JobID,State,Start,End"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows = {r.split("|")[0]: tuple(r.split("|")[1:]) for r in out.splitlines() if r}
        if (rows and all(s == "COMPLETED" for s, _, _ in rows.values())) or time.time() > deadline:
            return rows
        time.sleep(1)


def _study(tmp_path, name: str) -> SweepStudy:
    path = tmp_path / f"{name}.yaml"
    path.write_text(SWEEP)
    return SweepStudy.create(load_sweep(path), tmp_path / "runs", slurm.trial_job_outcomes)


def test_slurm_array_drains_a_grid_sweep_every_trial_once(cluster, tmp_path):
    study = _study(tmp_path, "tiny")
    resources = slurm.slurm_resources(study.spec.launcher)
    jobs = slurm.submit_slurm_workers(study.sweep_dir, 2, resources)
    ran = [job.result() for job in jobs]  # trials each worker ran; raises if a worker failed
    assert sum(ran) == 4
    trials = study.trials()
    assert len(trials) == 4 and all(t.state == "COMPLETE" and t.attempt == 1 for t in trials), trials
    assert len({t.key for t in trials}) == 4
    for t in trials:
        summary = json.loads((t.run_dir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["resumed_from_epoch"] is None
    records = submitted_jobs(study.sweep_dir)
    assert [r["job_id"] for r in records] == [j.job_id for j in jobs]
    assert all(r["launcher"] == "slurm" for r in records)
    array_ids = {r["job_id"].split("_")[0] for r in records}
    assert len(array_ids) == 1, "one job array"
    acct = _sacct(array_ids.pop())
    assert sorted(acct) == sorted(j.job_id for j in jobs)
    assert {s for s, _, _ in acct.values()} == {"COMPLETED"}, acct
    assert {t.worker for t in trials} <= {r["worker"] for r in records}


def test_array_parallelism_limits_concurrent_workers(cluster, tmp_path):
    # The node has 2 CPUs and each worker takes 1, so a limit of 2 could never be exceeded: test 1.
    # The sweep has no work left, so each worker starts, finds nothing and leaves (a few seconds).
    study = _study(tmp_path, "drained")
    for _ in range(4):
        claim = study.claim("test")
        study.finish(claim, TrialState.COMPLETE, 0.0)
    resources = slurm.slurm_resources(study.spec.launcher, {"array_parallelism": 1})
    jobs = slurm.submit_slurm_workers(study.sweep_dir, 3, resources)
    assert [job.result() for job in jobs] == [0, 0, 0]
    acct = _sacct(jobs[0].job_id.split("_")[0])
    assert {s for s, _, _ in acct.values()} == {"COMPLETED"}, acct
    spans = sorted((datetime.fromisoformat(a), datetime.fromisoformat(b)) for _, a, b in acct.values())
    assert len(spans) == 3
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, f"two workers overlapped: {spans}"


def test_max_array_size_is_read_from_the_cluster(cluster):
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    assert f"MaxArraySize            = {slurm.max_array_size()}" in out


def test_workers_beyond_max_array_size_go_into_several_arrays(cluster, tmp_path, monkeypatch):
    study = _study(tmp_path, "split")
    for _ in range(4):
        claim = study.claim("test")
        study.finish(claim, TrialState.COMPLETE, 0.0)
    monkeypatch.setattr(slurm, "max_array_size", lambda: 2)
    resources = slurm.slurm_resources(study.spec.launcher)
    jobs = slurm.submit_slurm_workers(study.sweep_dir, 3, resources)
    assert [job.result() for job in jobs] == [0, 0, 0]
    ids = [j.job_id for j in jobs]
    assert ids[0].endswith("_0") and ids[1].endswith("_1") and "_" not in ids[2], ids
    assert ids[0].split("_")[0] == ids[1].split("_")[0] != ids[2]


def _one_long_trial(tmp_path, name: str) -> tuple[SweepStudy, submitit.Job]:
    """A sweep of one trial far longer than the test (~0.5 s per epoch), claimed by one SLURM worker;
    returns once the worker has recorded its job on the trial."""
    body = yaml.safe_load(SWEEP)
    body |= {
        "overrides": [
            *body["overrides"],
            "trainer.epochs=100",
            "data.generator.videos_per_task=6",
            "data.split_fractions=[0.34,0.33,0.33]",
        ],
        "seeds": [0],
        "grid": {"trainer.lr": [0.001]},
        "workers": 1,
        "lease": {"heartbeat_s": 1, "timeout_s": 5, "max_retries": 1},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    # as `ablate sweep` does: the queue learns how SLURM jobs ended through the injected accounting
    study = SweepStudy.create(load_sweep(path), tmp_path / "runs", slurm.trial_job_outcomes)
    (job,) = slurm.submit_slurm_workers(study.sweep_dir, 1, slurm.slurm_resources(study.spec.launcher))
    deadline = time.monotonic() + 60
    while not (claimed := [t for t in study.trials() if t.state == "RUNNING" and t.slurm_job]):
        assert time.monotonic() < deadline, f"no trial claimed in 60 s; job {job.job_id} is {job.state}"
        time.sleep(0.1)
    assert claimed[0].slurm_job == job.job_id
    return study, job


def _given_back(study: SweepStudy, timeout: float = 60) -> TrialRecord:
    """The trial, once it is failed and its retry enqueued (recovering it when its lease runs out, as a
    worker would)."""
    deadline = time.monotonic() + timeout
    while study.trials()[0].state == "RUNNING":
        assert time.monotonic() < deadline, f"the trial is still RUNNING after {timeout} s"
        study.recover_stale()
        time.sleep(0.2)
    lost, retry = study.trials()
    assert lost.state == "FAIL" and retry.state == "WAITING" and retry.key == lost.key
    assert retry.slurm_job is None  # not claimed yet
    return lost


@pytest.mark.slow
def test_sigkilled_worker_is_recovered_as_out_of_memory_with_its_job(cluster, tmp_path):
    study, job = _one_long_trial(tmp_path, "oom")
    # what the kernel's OOM killer does: SIGKILL to the worker process, which cannot react
    pids = subprocess.run(["scontrol", "listpids", job.job_id], capture_output=True, text=True, check=True)
    (pid,) = [int(row.split()[0]) for row in pids.stdout.splitlines()[1:] if row.split()[2] == "0"]
    os.kill(pid, signal.SIGKILL)
    lost = _given_back(study)
    assert lost.exit_reason == "out-of-memory" and lost.slurm_job == job.job_id
    assert re.fullmatch(
        rf"worker lost: no heartbeat for \d+ s \(worker \S+\): slurm job {job.job_id} FAILED \(exit 9:0\)",
        lost.reason,
    ), lost.reason


@pytest.mark.slow
def test_cancelled_worker_job_is_recorded_with_its_job_id_and_state(cluster, tmp_path, capsys):
    study, job = _one_long_trial(tmp_path, "cancel")
    subprocess.run(["scancel", job.job_id], check=True, capture_output=True)
    # the worker gives its trial back at SIGTERM; one that cannot is SIGKILLed after KillWait and its
    # trial recovered by the lease: either way the failure names the job and why it ended
    lost = _given_back(study)
    assert lost.exit_reason == "cancelled" and lost.slurm_job == job.job_id
    assert re.search(rf": slurm job {job.job_id} CANCELLED \(exit \d+:\d+\)$", lost.reason), lost.reason
    deadline = time.monotonic() + 60
    while slurm.job_states([job.job_id])[job.job_id].state != "CANCELLED":  # squeue: COMPLETING first
        assert time.monotonic() < deadline, f"job {job.job_id} never left squeue"
        time.sleep(0.2)

    capsys.readouterr()
    assert main(["status", "cancel", "--json", "--root", str(tmp_path / "runs")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["kind"], r["state"], r["job_id"], r["job_state"], r["exit_reason"]) for r in rows[:2]] == [
        ("trial", "FAIL", job.job_id, "CANCELLED", "cancelled"),
        ("trial", "WAITING", None, None, None),
    ]
    assert rows[2:] == [
        {
            "kind": "array",
            "array": job.job_id.split("_")[0],
            "jobs": 1,
            "pending": 0,
            "running": 0,
            "completed": 0,
            "failed": 1,
            "unknown": 0,
            "failed_by_reason": {"cancelled": 1},
            "job_states": {job.job_id: "CANCELLED"},
        }
    ]
    assert main(["status", "cancel", "--root", str(tmp_path / "runs")]) == 0
    text = capsys.readouterr().out
    assert re.search(rf"^0 +\S+ +1 +{job.job_id} +CANCELLED +cancelled +\S", text, re.MULTILINE), text
    assert re.search(r"^\d+ +1 +0 +0 +0 +1 +0 +cancelled 1$", text, re.MULTILINE), text


def test_cluster_example_resources_are_valid():
    # the whole file loads in tests/test_sweep_spec.py (every shipped sweep); here: its SLURM resources
    launcher = yaml.safe_load((sweeps_dir() / "cluster_example.yaml").read_text())["launcher"]
    assert launcher["name"] == "slurm"
    resources = slurm.slurm_resources(launcher)
    assert resources["timeout_min"] == 240 and resources["slurm_gpus_per_task"] == 1
    assert resources["cpus_per_task"] == 8 and resources["mem_gb"] == 32.0


def test_resources_become_submitit_parameters():
    launcher = {
        "name": "slurm",
        "slurm": {
            "partition": "gpu",
            "account": "lab",
            "qos": "high",
            "time": "1-02:03:04",
            "cpus_per_task": 4,
            "gpus_per_task": 1,
            "mem": "16G",
            "constraint": "a100&ib",
            "array_parallelism": 8,
            "additional_parameters": {"exclude": "node13", "requeue": True},
            "setup": ["module load cuda", "export X='a b'"],
        },
    }
    assert slurm.slurm_resources(launcher, {"partition": "debug", "time": 90}) == {
        "timeout_min": 90,
        "slurm_partition": "debug",
        "slurm_account": "lab",
        "slurm_qos": "high",
        "slurm_constraint": "a100&ib",
        "cpus_per_task": 4,
        "slurm_gpus_per_task": 1,
        "slurm_array_parallelism": 8,
        "mem_gb": 16.0,
        "slurm_additional_parameters": {"exclude": "node13", "requeue": True},
        "slurm_setup": ["module load cuda", "export X='a b'"],
    }
    assert slurm.slurm_resources(launcher)["timeout_min"] == (26 * 60 + 3) + 1  # seconds round up
    assert slurm.slurm_resources({"name": "slurm"}) == {"timeout_min": slurm.DEFAULT_TIME_MIN}
    assert slurm.parse_time("00:30:00") == 30 and slurm.parse_mem_mb("500M") == 500


@pytest.mark.parametrize(
    ("resources", "key"),
    [
        ({"gpu": 1}, "launcher.slurm.gpu"),
        ({"time": "1:00"}, "launcher.slurm.time"),
        ({"time": "01:61:00"}, "launcher.slurm.time"),
        ({"time": "2 hours"}, "launcher.slurm.time"),
        ({"time": 0}, "launcher.slurm.time"),
        ({"time": "00:00:00"}, "launcher.slurm.time"),
        ({"cpus_per_task": 0}, "launcher.slurm.cpus_per_task"),
        ({"cpus_per_task": "4"}, "launcher.slurm.cpus_per_task"),
        ({"gpus_per_task": -1}, "launcher.slurm.gpus_per_task"),
        ({"gpus_per_task": True}, "launcher.slurm.gpus_per_task"),
        ({"array_parallelism": 0}, "launcher.slurm.array_parallelism"),
        ({"mem": "4 GB"}, "launcher.slurm.mem"),
        ({"mem": "-4G"}, "launcher.slurm.mem"),
        ({"mem": 0}, "launcher.slurm.mem"),
        ({"partition": ""}, "launcher.slurm.partition"),
        ({"partition": "gpu\nrm -rf ~"}, "launcher.slurm.partition"),
        ({"account": 3}, "launcher.slurm.account"),
        ({"additional_parameters": ["exclude=n1"]}, "launcher.slurm.additional_parameters"),
        ({"additional_parameters": {"x\n#": "1"}}, "launcher.slurm.additional_parameters.x\n#"),
        ({"additional_parameters": {"array": "0-9"}}, "launcher.slurm.additional_parameters.array"),
        (
            {"additional_parameters": {"cpus-per-task": 8}},
            "launcher.slurm.additional_parameters.cpus-per-task",
        ),
        ({"additional_parameters": {"exclude": "a\nb"}}, "launcher.slurm.additional_parameters.exclude"),
        ({"setup": "module load cuda"}, "launcher.slurm.setup"),
        ({"setup": ["ok", "two\nlines"]}, "launcher.slurm.setup[1]"),
    ],
)
def test_bad_resources_raise_value_error_naming_the_key(resources, key):
    with pytest.raises(ValueError, match=rf"^{re.escape(key)}:"):
        slurm.slurm_resources({"name": "slurm", "slurm": resources})
