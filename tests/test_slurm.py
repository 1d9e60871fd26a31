"""Sweep workers as SLURM job arrays, against a real one-node cluster (`bash tests/slurm/start_slurm.sh`).

Without a cluster the cluster tests are skipped, except under CI (CI=true), where that is a failure.
"""

import itertools
import json
import os
import re
import shutil
import subprocess
import time
from datetime import datetime

import pytest
from optuna.trial import TrialState

from launchers.sweeps import slurm
from launchers.sweeps.local import submitted_jobs
from launchers.sweeps.spec import load_sweep
from launchers.sweeps.study import SweepStudy

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
    return SweepStudy.create(load_sweep(path), tmp_path / "runs")


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
