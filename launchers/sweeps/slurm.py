"""Submit sweep workers to SLURM as job arrays through submitit.

A worker is the same `run_worker(sweep_dir, name)` the local launcher runs; SLURM only decides where
and when. The sweep dir must be on a filesystem the compute nodes share with the submitting host.
Resources come from the sweep file's `launcher.slurm` mapping (plus optional overrides, e.g. from the
command line) and are validated before anything is submitted:

    launcher:
      name: slurm
      slurm: {partition: gpu, time: "04:00:00", cpus_per_task: 4, gpus_per_task: 1, mem: 16G,
              array_parallelism: 8, account: lab, qos: normal, constraint: a100,
              additional_parameters: {exclude: node13}, setup: ["module load cuda"]}

Every value reaches sbatch as a submitit parameter (which quotes it); only `setup` is shell text, by
design: the sweep file's author writes those lines as they would in an sbatch script.

The job accounting half (`exit_reason`, `sacct_states`, `job_states`, `trial_job_outcomes`) tells
why a worker's job ended - preempted, timeout, out-of-memory, crash, node failure, cancelled - for
the lease recovery (injected into the sweep queue) and `ablate status`. Each pass asks squeue/sacct
once for all its jobs, and everything works (without reasons) where there are no such commands.
"""

from __future__ import annotations

import functools
import math
import os
import re
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

DEFAULT_TIME_MIN = 24 * 60  # submitit's own default (5 min) would kill a worker mid-sweep
DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's default MaxArraySize
STRING_KEYS = ("partition", "account", "qos", "constraint")
# key -> smallest value; tasks_per_node > 1: each worker trains its trials data parallel over its tasks
COUNT_KEYS = {"cpus_per_task": 1, "gpus_per_task": 0, "tasks_per_node": 1, "array_parallelism": 1}
KEYS = (*STRING_KEYS, *COUNT_KEYS, "time", "mem", "additional_parameters", "setup")
# sbatch options that submitit or this module set: additional_parameters must not replace them
RESERVED = {"array", "output", "error", "open-mode", "signal", "job-name", "wckey", "time"} | {
    k.replace("_", "-") for k in KEYS
}
_FLAG = re.compile(r"[a-z][a-z0-9_-]*")
_TIME = re.compile(r"(?:(\d+)-)?(\d+):(\d{1,2}):(\d{1,2})")  # [D-]HH:MM:SS
_MEM = re.compile(r"(\d+)([KMGT]?)B?", re.IGNORECASE)
_MEM_MB = {"K": 1 / 1024, "M": 1, "": 1, "G": 1024, "T": 1024 * 1024}  # Slurm reads a bare number as MB


def _key(key: str) -> str:
    return f"launcher.slurm.{key}"


def _text(key: str, value: Any) -> str:
    """A one-line string: a newline in an sbatch option would end the `#SBATCH` line."""
    if not isinstance(value, str) or not value or any(c < " " or c == "\x7f" for c in value):
        raise ValueError(f"{_key(key)}: expected a non-empty one-line string, got {value!r}")
    return value


def _count(key: str, value: Any) -> int:
    low = COUNT_KEYS[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{_key(key)}: expected an integer >= {low}, got {value!r}")
    return value


def parse_time(value: Any) -> int:
    """Minutes (an int) or "[D-]HH:MM:SS" -> whole minutes, rounded up (Slurm's limit is per minute)."""
    if isinstance(value, int) and not isinstance(value, bool):
        minutes = value
    else:
        m = _TIME.fullmatch(value) if isinstance(value, str) else None
        if m is None or int(m[3]) > 59 or int(m[4]) > 59:
            raise ValueError(f"{_key('time')}: expected minutes or [D-]HH:MM:SS, got {value!r}")
        days, hours, mins, secs = (int(g or 0) for g in m.groups())
        minutes = ((days * 24 + hours) * 60 + mins) + (secs > 0)
    if minutes < 1:
        raise ValueError(f"{_key('time')}: must be at least one minute, got {value!r}")
    return minutes


def parse_mem_mb(value: Any) -> int:
    """ "16G", "500M", "2T" (or a bare number of MB, as sbatch reads it) -> MB."""
    m = _MEM.fullmatch(value) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        mb = value
    elif m is not None:
        mb = int(int(m[1]) * _MEM_MB[m[2].upper()])
    else:
        raise ValueError(f"{_key('mem')}: expected e.g. 16G, 500M or a number of MB, got {value!r}")
    if mb < 1:
        raise ValueError(f"{_key('mem')}: must be at least 1M, got {value!r}")
    return mb


def _additional(value: Any) -> dict[str, str | int | bool]:
    """Extra sbatch options: names are pasted into `#SBATCH --name=value` unquoted, so they are checked."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{_key('additional_parameters')}: expected a mapping of sbatch options")
    out: dict[str, str | int | bool] = {}
    for name, v in value.items():
        key = f"additional_parameters.{name}"
        if not isinstance(name, str) or not _FLAG.fullmatch(name):
            raise ValueError(f"{_key(key)}: not an sbatch option name")
        if name.replace("_", "-") in RESERVED:
            raise ValueError(f"{_key(key)}: set by the launcher; use launcher.slurm.<key> where there is one")
        out[name] = v if isinstance(v, bool | int) else _text(key, v)
    return out


def _setup(value: Any) -> list[str]:
    if not isinstance(value, list | tuple):
        raise ValueError(f"{_key('setup')}: expected a list of shell lines")
    return [_text(f"setup[{i}]", line) for i, line in enumerate(value)]


def slurm_resources(
    spec_launcher: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Validate the sweep file's `launcher.slurm` resources (`overrides` win key by key) and return them
    as submitit AutoExecutor parameters. Raises ValueError naming the key, before anything is submitted."""
    raw = {**(spec_launcher.get("slurm") or {}), **(overrides or {})}
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ValueError(f"{_key(unknown[0])}: unknown SLURM resource; known: {', '.join(KEYS)}")
    params: dict[str, Any] = {"timeout_min": parse_time(raw.get("time", DEFAULT_TIME_MIN))}
    for key in STRING_KEYS:
        if key in raw:
            params[f"slurm_{key}"] = _text(key, raw[key])
    if "cpus_per_task" in raw:
        params["cpus_per_task"] = _count("cpus_per_task", raw["cpus_per_task"])
    if "gpus_per_task" in raw:
        params["slurm_gpus_per_task"] = _count("gpus_per_task", raw["gpus_per_task"])
    if "tasks_per_node" in raw:
        params["tasks_per_node"] = _count("tasks_per_node", raw["tasks_per_node"])
    if "array_parallelism" in raw:
        params["slurm_array_parallelism"] = _count("array_parallelism", raw["array_parallelism"])
    if "mem" in raw:
        params["mem_gb"] = parse_mem_mb(raw["mem"]) / 1024  # exact: submitit writes it back as MB
    if "additional_parameters" in raw:
        params["slurm_additional_parameters"] = _additional(raw["additional_parameters"])
    if "setup" in raw:
        params["slurm_setup"] = _setup(raw["setup"])
    return params


@functools.cache
def max_array_size() -> int:
    """The cluster's MaxArraySize (array indices run 0..MaxArraySize-1), read once per process."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return DEFAULT_MAX_ARRAY_SIZE
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.MULTILINE)
    return int(m[1]) if m else DEFAULT_MAX_ARRAY_SIZE


def submit_slurm_workers(sweep_dir: Path, n: int, resources: Mapping[str, Any]) -> list[submitit.Job]:
    """Submit `n` workers for the sweep in `sweep_dir` as job arrays (split at MaxArraySize); `resources`
    come from `slurm_resources`. Job ids ("<array>_<task>") are recorded in jobs.json."""
    # imported here: the worker and the study import this module's job accounting
    from launchers.snapshot import snapshot_setup, sweep_code
    from launchers.sweeps.local import record_jobs
    from launchers.sweeps.worker import run_worker

    sweep_dir = Path(sweep_dir).resolve()  # the job's working directory may differ
    if (code := sweep_code(sweep_dir)) is not None:  # the job imports the sweep's code snapshot
        resources = {**resources, "slurm_setup": [*resources.get("slurm_setup", []), *snapshot_setup(code)]}
    executor = submitit.AutoExecutor(folder=sweep_dir / "workers", cluster="slurm")
    executor.update_parameters(name=f"ablate-{sweep_dir.name}", **resources)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    names = [f"slurm-{stamp}-{i}" for i in range(n)]
    size = max_array_size()
    jobs: list[submitit.Job] = []
    for start in range(0, n, size):
        chunk = names[start : start + size]
        jobs += executor.map_array(run_worker, [sweep_dir] * len(chunk), chunk)
    record_jobs(sweep_dir, "slurm", stamp, jobs, names)
    return jobs


# ---------------------------------------------------------------------------------- job accounting
QUERY_TIMEOUT_S = 30  # a controller that does not answer must not hang `ablate status` or a worker
REQUEUE_STATES = frozenset({"REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"})  # stopped; will run again
PENDING_STATES = REQUEUE_STATES | {"PENDING", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
RUNNING_STATES = frozenset(
    {"RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING"}
)
ENDED_STATES = {  # sacct's State of an ended job -> its exit reason
    "COMPLETED": "completed",
    "PREEMPTED": "preempted",
    "TIMEOUT": "timeout",
    "DEADLINE": "timeout",
    "OUT_OF_MEMORY": "out-of-memory",
    "NODE_FAIL": "node-failure",
    "BOOT_FAIL": "node-failure",
    "CANCELLED": "cancelled",
    "REVOKED": "cancelled",
    "FAILED": "crash",
}
SIGKILL = 9


def _exit_status(exit_code: str) -> tuple[int, int]:
    """sacct's ExitCode "code:signal" -> (code, signal); (0, 0) when there is none."""
    m = re.fullmatch(r"(\d+):(\d+)", exit_code.strip())
    return (int(m[1]), int(m[2])) if m else (0, 0)


def exit_reason(state: str, exit_code: str) -> str:
    """Why a job ended, from sacct's State and ExitCode ("code:signal"): completed, preempted, timeout,
    out-of-memory, node-failure, cancelled, crash, requeued (stopped, to run again) or unknown (a
    state not listed here); "" while it has not ended.

    A FAILED job killed by SIGKILL (a shell's exit 137; Slurm records 9:0 or 0:9) counts as
    out-of-memory: Slurm's own kills come with their own states (CANCELLED, TIMEOUT, PREEMPTED), so
    what is left is, as a rule, the kernel's OOM killer on a node without memory cgroups."""
    name = state.split(" ")[0].upper()  # "CANCELLED by 1000"
    code, sig = _exit_status(exit_code)
    if name in REQUEUE_STATES:
        return "requeued"
    if name in PENDING_STATES or name in RUNNING_STATES:
        return ""
    if name == "FAILED" and (code in (SIGKILL, 128 + SIGKILL) or sig == SIGKILL):
        return "out-of-memory"
    if name == "COMPLETED" and (code or sig):
        return "crash"
    return ENDED_STATES.get(name, "unknown")


@dataclass(frozen=True)
class JobState:
    """One job (or array task) as squeue or sacct see it now."""

    job_id: str  # "<array id>_<task id>" for an array task
    state: str  # RUNNING, TIMEOUT, CANCELLED (sacct's "CANCELLED by <uid>" loses the uid), ...
    exit_code: str  # "code:signal"; "" from squeue (a live job has none)
    reason: str  # Slurm's reason: why it is pending, why its node failed; "" for None
    start: float | None  # when its current run started (epoch seconds); None before that

    @property
    def exit_reason(self) -> str:
        return exit_reason(self.state, self.exit_code)

    @property
    def phase(self) -> str:
        """pending, running, completed or failed (ended any other way)."""
        if self.state in PENDING_STATES:
            return "pending"
        if self.state in RUNNING_STATES:
            return "running"
        return "completed" if self.exit_reason == "completed" else "failed"

    def describe(self) -> str:
        """The job for a person: its exit code once it ended, else why it waits (sacct keeps the last
        pending reason of ended jobs too), e.g. `slurm job 123_4 TIMEOUT (exit 0:15)`."""
        ended = self.phase in ("completed", "failed")
        details = f"exit {self.exit_code}" if ended and self.exit_code else "" if ended else self.reason
        return f"slurm job {self.job_id} {self.state}" + (f" ({details})" if details else "")


def current_job_id() -> str | None:
    """The SLURM job this process runs in, as squeue and sacct name it ("<array>_<task>" for an array
    task); None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def _query(command: list[str], wanted: set[str], columns: tuple[str, ...]) -> dict[str, JobState]:
    """Run a `--parsable2`-style query over the arrays/jobs of `wanted` and keep the rows of `wanted`;
    {} when the command is missing, fails (squeue fails when none of the jobs is live) or hangs."""
    ids = ",".join(sorted({job_id.split("_")[0] for job_id in wanted}))  # a whole array at once
    try:
        out = subprocess.run(
            [*command, ids],
            capture_output=True,
            text=True,
            timeout=QUERY_TIMEOUT_S,
            check=True,
            env={**os.environ, "SLURM_TIME_FORMAT": "%s"},  # times as epoch seconds
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    states = {}
    for line in out.splitlines():
        row = dict(zip(columns, line.split("|"), strict=False))
        if row.get("job_id") not in wanted:  # steps, other tasks, pending ranges like 12_[3-9]
            continue
        start = row.get("start", "")
        states[row["job_id"]] = JobState(
            job_id=row["job_id"],
            state=row.get("state", "").split(" ")[0],
            exit_code=row.get("exit_code", ""),
            reason="" if row.get("reason") in (None, "None") else row["reason"],
            start=float(start) if start.isdigit() else None,
        )
    return states


def sacct_states(job_ids: Iterable[str]) -> dict[str, JobState]:
    """State, exit code and reason of each job from the accounting database, in one sacct call; jobs
    it does not know (sacct lags a moment behind, or there is no accounting) are left out."""
    wanted = set(job_ids)
    if not wanted:
        return {}
    command = ["sacct", "-X", "--parsable2", "--noheader", "-o", "JobID,State,ExitCode,Reason,Start", "-j"]
    return _query(command, wanted, ("job_id", "state", "exit_code", "reason", "start"))


def job_states(job_ids: Iterable[str]) -> dict[str, JobState]:
    """The current state of each job: squeue for live ones, sacct for those squeue no longer lists
    (one call each); jobs neither knows are left out."""
    wanted = set(job_ids)
    if not wanted:
        return {}
    command = ["squeue", "--noheader", "--array", "-o", "%i|%T|%r|%S", "-j"]
    live = _query(command, wanted, ("job_id", "state", "reason", "start"))
    return {**sacct_states(wanted - live.keys()), **live}


def job_outcome(attrs: dict[str, Any], jobs: dict[str, JobState]) -> tuple[str, str]:
    """What Slurm says of the job that claimed a trial (`attrs`: the trial's lease): a description for the
    failure reason ("" outside SLURM) and why the job ended ("" when it is unknown: no accounting,
    or as far as Slurm knows it still runs: a stalled worker, or Slurm has not noticed yet)."""
    job_id = attrs.get("slurm_job")
    if job_id is None:
        return "", ""
    job = jobs.get(job_id)
    if job is None:
        return f"slurm job {job_id} (state unknown: no sacct, or it lags)", ""
    if not job.exit_reason and job.start is not None and job.start > attrs.get("claimed_at", math.inf):
        # live again, started after the claim: stopped and requeued, the trial's run is gone
        return f"{job.describe()} again after a requeue", "requeued"
    return job.describe(), job.exit_reason


def trial_job_outcomes(attrs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The sweep queue's `JobOutcomes` on SLURM (`attrs`: the trials' leases): one sacct call for all."""
    jobs = sacct_states(a["slurm_job"] for a in attrs if "slurm_job" in a)
    return [job_outcome(a, jobs) for a in attrs]
