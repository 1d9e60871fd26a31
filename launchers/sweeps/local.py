"""Submit sweep workers as local processes through submitit's local executor.

The same worker function runs under SLURM later; only the executor differs. Jobs outlive the
`ablate sweep` process that submitted them (submitit's controllers are detached), and each worker
writes its stdout/stderr under `<sweep dir>/workers/<job id>_0_log.{out,err}`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import submitit

from core.atomic import atomic_write_json
from launchers.snapshot import snapshot_setup, sweep_code
from launchers.sweeps.worker import run_worker

WEEK_MIN = 7 * 24 * 60  # submitit's local default kills a job after 2 minutes


def jobs_file(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / "jobs.json"


def submitted_jobs(sweep_dir: Path) -> list[dict]:
    path = jobs_file(sweep_dir)
    return json.loads(path.read_text()) if path.exists() else []


def record_jobs(
    sweep_dir: Path, launcher: str, stamp: str, jobs: list[submitit.Job], names: list[str]
) -> None:
    """Append the submitted workers to jobs.json, so `ablate status` can show a trial's job id."""
    records = submitted_jobs(sweep_dir) + [
        {"job_id": j.job_id, "worker": name, "launcher": launcher, "submitted": stamp}
        for j, name in zip(jobs, names, strict=True)
    ]
    atomic_write_json(jobs_file(sweep_dir), records)


def submit_local_workers(sweep_dir: Path, n: int) -> list[submitit.Job]:
    """Start `n` workers draining the sweep in `sweep_dir`; their job ids are recorded in jobs.json."""
    sweep_dir = Path(sweep_dir).resolve()  # the workers start in the sweep's code snapshot
    executor = submitit.AutoExecutor(folder=sweep_dir / "workers", cluster="local")
    code = sweep_code(sweep_dir)
    executor.update_parameters(
        timeout_min=WEEK_MIN, **({"local_setup": snapshot_setup(code)} if code else {})
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    names = [f"local-{stamp}-{i}" for i in range(n)]
    jobs = [executor.submit(run_worker, sweep_dir, name) for name in names]
    record_jobs(sweep_dir, "local", stamp, jobs, names)
    return jobs
