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
"""

from __future__ import annotations

import functools
import re
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import submitit

from launchers.sweeps.local import record_jobs
from launchers.sweeps.worker import run_worker

DEFAULT_TIME_MIN = 24 * 60  # submitit's own default (5 min) would kill a worker mid-sweep
DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's default MaxArraySize
STRING_KEYS = ("partition", "account", "qos", "constraint")
COUNT_KEYS = {"cpus_per_task": 1, "gpus_per_task": 0, "array_parallelism": 1}  # key -> smallest value
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
    sweep_dir = Path(sweep_dir).resolve()  # the job's working directory may differ
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
