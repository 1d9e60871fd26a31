"""Runs that live only on a wandb server -> the DataFrames of `analysis.records` (load_runs, load_history).

For results nobody has on disk any more (a cluster's run dirs cleaned up, a colleague's project). What
ablate logs (launchers/tracking.py): config = the resolved config; group = the sweep (or experiment);
name = `trials/<trial key>` for a sweep trial; tags = the config's tags + the trial's `axis=label`; one
history row per epoch (step = epoch); at the end a summary with the evaluated checkpoint's metrics,
`best/<checkpoint>` and the status. From these the run's summary.json record is rebuilt and turned into
columns by the code that reads local run dirs (`records.record_columns`), so tables and plots take either.

What the server does not hold, and what stands in for it:
- the Optuna columns `number`, `attempt`, `value` are absent;
- parameter columns are the tag text (grid labels exactly; a search value as text, typed in `cfg.<path>`);
- `best_epoch/<checkpoint>`: the first epoch at the minimum of the checkpoint's metric in the history, the
  rule core/train/loop.py keeps it by;
- `wall_time_s`: wandb's runtime of the run (whole seconds; all attempts of a resumed run);
- `reason`: what the wandb state says (crashed, failed, killed), not the exception;
- `gpus`: from `trainer.device` only (no SLURM allocation is logged);
- `run_dir`: the run's URL on the server (history rows join back on it).
The evaluated `val/` metrics are the summary's: right when each epoch's row was committed as it was
logged; a reporter that leaves the last row to `finish` lets it overwrite them with last-epoch values.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import pandas as pd

from analysis.records import RUN_STATUS, concat_history, history_frame, record_columns

# wandb run state -> the state vocabulary of the tables (finished: the run's own status says which)
WANDB_STATES = {
    "running": "running",
    "pending": "waiting",
    "preempting": "running",
    "preempted": "waiting",
    "crashed": "failed",
    "failed": "failed",
    "killed": "failed",
}
WANDB_REASONS = {
    "crashed": "wandb: run crashed (its process stopped sending heartbeats)",
    "failed": "wandb: run failed (non-zero exit code)",
    "killed": "wandb: run killed",
}
TRIAL_PREFIX = "trials/"  # wandb name of a sweep trial: <run dir's parent>/<trial key>


class WandbExport(NamedTuple):
    """`runs`: one row per run, the columns of `load_runs`; `history`: the long format of `load_history`."""

    runs: pd.DataFrame
    history: pd.DataFrame


def _number(value: Any) -> Any:
    """wandb writes an integral float (epoch 1.0) as 1: metrics are floats, as in metrics.jsonl."""
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _epochs(run: Any, page_size: int) -> list[dict[str, Any]]:
    """The run's full history, one record per epoch, read page by page; wandb's own keys (_step,
    _runtime, _timestamp) dropped."""
    return [
        {k: _number(v) for k, v in row.items() if not k.startswith("_")}
        for row in run.scan_history(page_size=page_size)
    ]


def _best_epoch(records: list[dict[str, Any]], metric: str | None) -> int | None:
    """The first epoch at the minimum of `metric` over finite values (the loop's strict `<` rule)."""
    if metric is None:
        return None
    values = [
        (r["epoch"], r[metric])
        for r in records
        if isinstance(r.get(metric), float) and math.isfinite(r[metric])
    ]
    return int(min(values, key=lambda ev: ev[1])[0]) if values else None


def _checkpoint_metrics(family: str | None) -> dict[str, str]:
    """Checkpoint name -> the validation metric its best is kept by, as the family declares it."""
    from core.train.families import family_module  # imports the family's torch code: only when asked

    try:
        return dict(family_module(str(family)).Task.best_checkpoints)
    except ValueError:  # a family this checkout does not know
        return {}


def summary_record(
    run: Any, config: dict[str, Any], records: list[dict[str, Any]] | None, state: str
) -> dict[str, Any]:
    """The summary.json record (core/train/run.py) of a wandb run, from its summary and `records` (its
    history; None when not read). Like a local run, only a run that ended (complete, pruned) has
    epochs_run, final, best and eval metrics."""
    summary = run.summary_metrics
    record: dict[str, Any] = {
        "experiment": config.get("experiment_name"),
        "status": summary.get("status"),
        "wall_time_s": _number((summary.get("_wandb") or {}).get("runtime")),
        "environment": {"git_commit": run.commit},
    }
    if state not in ("complete", "pruned"):
        return record
    # keys sorted as in summary.json (wandb-core returns them in no fixed order)
    if records is None:
        record["epochs_run"] = summary.get("_step", -1) + 1
    else:
        record.update(epochs_run=len(records), final=dict(sorted(records[-1].items())) if records else {})
    metrics = _checkpoint_metrics(config.get("family"))
    record["best"] = {
        name: {
            "value": _number(summary[f"best/{name}"]),
            "epoch": _best_epoch(records or [], metrics.get(name)),
        }
        for name in sorted(k.removeprefix("best/") for k in summary if k.startswith("best/"))
    }
    # the evaluation wrote val/<m> and test/<m> for the same <m>; other val/ keys are last-epoch values
    record["eval"] = {
        k: _number(summary[k])
        for k in sorted(summary)
        if k.startswith("test/") or (k.startswith("val/") and f"test/{k[4:]}" in summary)
    }
    return record


def run_row(run: Any, records: list[dict[str, Any]] | None) -> dict[str, Any]:
    """One row of `load_runs` (a sweep's column order) for a wandb run."""
    config = run.config
    status = run.summary_metrics.get("status")
    state = RUN_STATUS.get(status, "complete") if run.state == "finished" else WANDB_STATES.get(run.state)
    sweep = key = None
    params: dict[str, str] = {}
    if (run.name or "").startswith(TRIAL_PREFIX):
        sweep, key = run.group, run.name.removeprefix(TRIAL_PREFIX)
        config_tags = {str(t) for t in (config.get("logger") or {}).get("tags") or []}
        params = dict(t.split("=", 1) for t in run.tags if "=" in t and t not in config_tags)
    row: dict[str, Any] = {
        "sweep": sweep,
        "key": key,
        "state": state or run.state,
        "reason": WANDB_REASONS.get(run.state),
        **params,
        "seed": config.get("seed"),
        "run_dir": run.url,
    }
    row.update(record_columns(summary_record(run, config, records, row["state"]), config))
    return row


def from_wandb(
    path: str,
    filters: dict[str, Any] | None = None,
    *,
    history: bool = True,
    api: Any = None,
    per_page: int = 50,
    page_size: int = 1000,
) -> WandbExport:
    """Every run of the wandb project `path` ("entity/project") matching `filters` (wandb's MongoDB-style
    run filters, e.g. {"group": "demo"} for a sweep, {"state": "finished"}), as `load_runs` and
    `load_history` give local runs: `runs, history = from_wandb("lab/ablate", {"group": "demo"})`.

    Runs are listed `per_page` at a time with their config and summary; with `history` each run's full
    history is scanned (`page_size` steps a request): it gives the `final/` columns, `best_epoch/` and
    epochs_run. Without it nothing per run is fetched (fast for a large project): no `final/` columns,
    `best_epoch/` NaN, epochs_run from wandb's last step, and `history` empty.
    `api`: a `wandb.Api` (default: one from the environment's settings, WANDB_API_KEY, WANDB_BASE_URL)."""
    if api is None:
        import wandb  # slow import, only when the server is asked

        api = wandb.Api()
    rows, frames = [], []
    for run in api.runs(path, filters=filters or {}, per_page=per_page, lazy=False):
        records = _epochs(run, page_size) if history else None
        row = run_row(run, records)
        rows.append(row)
        frame = history_frame(records or [], row["run_dir"])
        if frame is not None:
            frames.append(frame)
    return WandbExport(pd.DataFrame(rows), concat_history(frames))
