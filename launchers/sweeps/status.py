"""`ablate status`: what a sweep is doing, as a table for people or JSON lines for scripts."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from launchers.sweeps.local import submitted_jobs
from launchers.sweeps.study import SweepStudy, TrialRecord

STATES = ("COMPLETE", "PRUNED", "RUNNING", "WAITING", "FAIL")


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


def _job_ids(study: SweepStudy) -> dict[str, str]:
    return {j["worker"]: j["job_id"] for j in submitted_jobs(study.sweep_dir)}


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
    jobs = _job_ids(study)
    running = [t for t in trials if t.state == "RUNNING"]
    if running:
        out += ["", "running:"]
        rows = [
            [
                t.number,
                t.key,
                t.worker,
                jobs.get(t.worker or ""),
                t.last_epoch,
                t.last_value,
                None if t.heartbeat_age is None else f"{t.heartbeat_age:.0f}s",
                _params(t),
            ]
            for t in running
        ]
        out.append(
            _table(["trial", "key", "worker", "job", "epochs", "last value", "heartbeat", "params"], rows)
        )
    failed = [t for t in trials if t.state == "FAIL"]
    if failed:
        out += ["", "failed:"]
        rows = [
            [t.number, t.key, t.attempt, (t.reason or "").splitlines()[0][:100] if t.reason else None]
            for t in failed
        ]
        out.append(_table(["trial", "key", "attempt", "reason"], rows))
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
                _params(t),
            ]
            for t in finished
        ]
        out.append(_table(["trial", "state", "seed", spec.metric, "epochs", "params"], rows))
    return "\n".join(out)


def status_json_lines(study: SweepStudy) -> str:
    """One JSON object per trial: key, state, params, seed, values, reason, job id."""
    jobs = _job_ids(study)
    lines = []
    for t in study.trials():
        lines.append(
            json.dumps(
                {
                    "number": t.number,
                    "key": t.key,
                    "state": t.state,
                    "params": t.params,
                    "seed": t.seed,
                    "value": t.value,
                    "last_value": t.last_value,
                    "last_epoch": t.last_epoch,
                    "attempt": t.attempt,
                    "reason": t.reason,
                    "worker": t.worker,
                    "job_id": jobs.get(t.worker or ""),
                    "run_dir": None if t.run_dir is None else str(t.run_dir),
                },
                sort_keys=True,
                default=str,
            )
        )
    return "\n".join(lines)
