"""`ablate status`: what a sweep is doing, as a table for people or JSON lines for scripts.

Next to each running or failed trial: its worker's job and, for SLURM jobs, the job's state now;
per job array, how many of its workers are pending, running, completed or failed (and why). That
costs one squeue and one sacct call per status, and none for a sweep without SLURM workers.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from core.provenance import run_code
from launchers.sweeps.local import submitted_jobs
from launchers.sweeps.slurm import JobState, job_states
from sweepstate.study import SweepStudy, TrialRecord

STATES = ("COMPLETE", "PRUNED", "RUNNING", "WAITING", "FAIL")
PHASES = ("pending", "running", "completed", "failed", "unknown")  # of a SLURM job


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])])


def _params(t: TrialRecord) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in sorted(t.params.items()) if k != "seed")


@dataclass(frozen=True)
class SweepJobs:
    """The worker jobs of a sweep (jobs.json) and the current state of its SLURM jobs."""

    records: list[dict[str, str]]
    states: dict[str, JobState]

    @classmethod
    def load(cls, study: SweepStudy, trials: list[TrialRecord]) -> SweepJobs:
        records = submitted_jobs(study.sweep_dir)
        slurm = {r["job_id"] for r in records if r["launcher"] == "slurm"}
        slurm |= {t.slurm_job for t in trials if t.slurm_job and t.state in ("RUNNING", "FAIL")}
        return cls(records, job_states(slurm))

    @cached_property
    def _by_worker(self) -> dict[str, str]:
        return {r["worker"]: r["job_id"] for r in self.records}

    def job_of(self, t: TrialRecord) -> str | None:
        """The job that claimed the trial: recorded on it (SLURM), else its worker's (local)."""
        return t.slurm_job or self._by_worker.get(t.worker or "")

    def arrays(self) -> list[dict[str, Any]]:
        """Per SLURM job array: its jobs by phase, the failed ones by exit reason, each job's state."""
        arrays: dict[str, list[str]] = {}
        for r in self.records:
            if r["launcher"] == "slurm":
                arrays.setdefault(r["job_id"].split("_")[0], []).append(r["job_id"])
        out = []
        for array, ids in arrays.items():
            known = [self.states[i] for i in ids if i in self.states]
            phases = Counter(job.phase for job in known)
            out.append(
                {
                    "array": array,
                    "jobs": len(ids),
                    **{phase: phases.get(phase, 0) for phase in PHASES[:-1]},
                    "unknown": len(ids) - len(known),
                    "failed_by_reason": dict(Counter(j.exit_reason for j in known if j.phase == "failed")),
                    "job_states": {i: self.states[i].state if i in self.states else None for i in ids},
                }
            )
        return out


def _job_state(jobs: SweepJobs, job_id: str | None) -> str | None:
    """The job's state for a person: a pending job says why it waits, a FAILED one how it failed."""
    job = jobs.states.get(job_id or "")
    if job is None:
        return None
    if job.phase == "pending" and job.reason:
        return f"{job.state} ({job.reason})"
    return f"{job.state} ({job.exit_reason})" if job.state == "FAILED" else job.state


def format_status(study: SweepStudy) -> str:
    spec, trials = study.spec, study.trials()
    counts = Counter(t.state for t in trials)
    out = [
        f"sweep {spec.name}: {spec.mode} over experiment '{spec.experiment}', objective {spec.metric} "
        f"({spec.direction}), budget {spec.budget}",
        "  ".join(f"{s.lower()} {counts.get(s, 0)}" for s in STATES),
    ]
    done = [t for t in trials if t.state == "COMPLETE" and t.value is not None]
    if done:
        pick = min if spec.direction == "minimize" else max
        best = pick(done, key=lambda t: t.value)
        where = f"trial {best.number}, seed {best.seed}"
        out.append(f"best so far: {spec.metric}={best.value:.4g} ({where}) {_params(best)}")
    jobs = SweepJobs.load(study, trials)
    running = [t for t in trials if t.state == "RUNNING"]
    if running:
        out += ["", "running:"]
        rows = [
            [
                t.number,
                t.key,
                t.worker,
                jobs.job_of(t),
                _job_state(jobs, jobs.job_of(t)),
                t.last_epoch,
                t.last_value,
                None if t.heartbeat_age is None else f"{t.heartbeat_age:.0f}s",
                _params(t),
            ]
            for t in running
        ]
        out.append(
            _table(
                ["trial", "key", "worker", "job", "job state", "epochs", "last value", "heartbeat", "params"],
                rows,
            )
        )
    failed = [t for t in trials if t.state == "FAIL"]
    if failed:
        out += ["", "failed:"]
        rows = [
            [
                t.number,
                t.key,
                t.attempt,
                jobs.job_of(t),
                _job_state(jobs, jobs.job_of(t)),
                t.exit_reason,
                (t.reason or "").splitlines()[0][:120] if t.reason else None,
            ]
            for t in failed
        ]
        out.append(_table(["trial", "key", "attempt", "job", "job state", "exit reason", "reason"], rows))
    finished = [t for t in trials if t.state in ("COMPLETE", "PRUNED")]
    if finished:
        out += ["", "finished:"]
        rows = [
            [
                t.number,
                t.state.lower(),
                t.seed,
                t.value,
                None if t.last_epoch is None else t.last_epoch + 1,
                run_code(t.run_dir),
                _params(t),
            ]
            for t in finished
        ]
        out.append(_table(["trial", "state", "seed", spec.metric, "epochs", "code", "params"], rows))
    arrays = jobs.arrays()
    if arrays:
        out += ["", "slurm workers:"]
        rows = [
            [
                a["array"],
                a["jobs"],
                *(a[phase] for phase in PHASES),
                " ".join(f"{why} {n}" for why, n in sorted(a["failed_by_reason"].items())) or None,
            ]
            for a in arrays
        ]
        out.append(_table(["array", "jobs", *PHASES, "failed by reason"], rows))
    return "\n".join(out)


def status_json_lines(study: SweepStudy) -> str:
    """One JSON object per trial ("kind": "trial": key, state, params, seed, values, reason, job id and
    state, exit reason), then one per SLURM job array ("kind": "array": its jobs by phase and state)."""
    trials = study.trials()
    jobs = SweepJobs.load(study, trials)
    lines = []
    for t in trials:
        job_id = jobs.job_of(t)
        lines.append(
            json.dumps(
                {
                    "kind": "trial",
                    "number": t.number,
                    "key": t.key,
                    "state": t.state,
                    "params": t.params,
                    "seed": t.seed,
                    "value": t.value,
                    "last_value": t.last_value,
                    "last_epoch": t.last_epoch,
                    "attempt": t.attempt,
                    "code": run_code(t.run_dir),
                    "reason": t.reason,
                    "worker": t.worker,
                    "job_id": job_id,
                    "job_state": jobs.states[job_id].state if job_id in jobs.states else None,
                    "exit_reason": t.exit_reason,
                    "run_dir": None if t.run_dir is None else str(t.run_dir),
                },
                sort_keys=True,
                default=str,
            )
        )
    lines += [json.dumps({"kind": "array", **a}, sort_keys=True) for a in jobs.arrays()]
    return "\n".join(lines)
