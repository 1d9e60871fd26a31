"""Run directories and sweeps -> pandas: one row per run or trial, and the long per-epoch history.

Reads only what runs leave on disk (summary.json, config.yaml, metrics.jsonl) and, for a sweep, its
Optuna study, so it works on a laptop with a copy of `runs/` and no server. Waiting, running and
failed trials are rows too (with NaN metrics), so a table of a sweep in progress counts them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from launchers.sweeps.spec import trial_key
from launchers.sweeps.study import SweepStudy, TrialRecord

# summary.json status / Optuna trial state -> the one state vocabulary of the tables
STATES = ("complete", "pruned", "failed", "running", "waiting")
_RUN_STATUS = {"completed": "complete", "pruned": "pruned", "failed": "failed", "running": "running"}
_TRIAL_STATE = {
    "COMPLETE": "complete",
    "PRUNED": "pruned",
    "FAIL": "failed",
    "RUNNING": "running",
    "WAITING": "waiting",
}


def _flatten(obj: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def run_dirs(path: str | Path) -> list[Path]:
    """Every run directory (a folder with a summary.json) at or below `path`, sorted."""
    path = Path(path)
    return sorted(p.parent for p in path.rglob("summary.json"))


def default_root() -> Path:
    """The results root the CLI uses when none is given: $ABLATE_ROOT or ./runs."""
    return Path(os.environ.get("ABLATE_ROOT") or "runs")


def sweep_dir_of(target: str | Path, root: Path | None = None) -> Path | None:
    """The sweep directory `target` names (a sweep dir, or a sweep name under `root`), else None."""
    path = Path(target)
    if (path / "sweep.json").is_file():
        return path
    if path.exists():
        return None
    named = Path(root or default_root()) / "sweeps" / str(target)
    return named if (named / "sweep.json").is_file() else None


def open_sweep(target: str | Path, root: Path | None = None) -> SweepStudy:
    """The sweep `target` names; ValueError (SweepError) naming where it looked if there is none."""
    return SweepStudy.open(sweep_dir_of(target, root) or target, root or default_root())


def summary_columns(run_dir: Path) -> dict[str, Any]:
    """What one run dir says about itself: status, config values as `cfg.<path>`, metrics.

    Metric columns: `final/<m>` (last epoch), `best/<checkpoint>` (+ `best_epoch/<checkpoint>`), and the
    eval metrics of the best checkpoint under their own names (`val/...`, `test/...`). Empty if the run
    has not written a summary yet."""
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").is_file():
        return {}
    summary = json.loads((run_dir / "summary.json").read_text())
    row: dict[str, Any] = {
        "experiment": summary.get("experiment"),
        "status": summary.get("status"),
        "epochs_run": summary.get("epochs_run", 0),
        "wall_time_s": summary.get("wall_time_s"),
        "git_commit": summary.get("environment", {}).get("git_commit"),
    }
    if summary.get("reason"):
        row["reason"] = summary["reason"]
    if (run_dir / "config.yaml").is_file():
        cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
        row.update({f"cfg.{k}": v for k, v in _flatten(cfg).items() if not isinstance(v, list)})
    for name, best in summary.get("best", {}).items():
        row[f"best/{name}"] = best["value"]
        row[f"best_epoch/{name}"] = best["epoch"]
    row.update({f"final/{k}": v for k, v in summary.get("final", {}).items()})
    row.update({k: v for k, v in summary.get("eval", {}).items() if "/" in k})
    return row


def _plain_runs(path: Path) -> pd.DataFrame:
    rows = []
    for d in run_dirs(path):
        row: dict[str, Any] = {"run_dir": str(d), "reason": None, **summary_columns(d)}
        row["state"] = _RUN_STATUS.get(row.get("status"), row.get("status"))
        row["seed"] = row.get("cfg.seed")
        if d.parent.name == "trials" and (d.parent.parent / "sweep.json").is_file():
            row["sweep"], row["key"] = d.parent.parent.name, d.name
        rows.append(row)
    return pd.DataFrame(rows)


def _latest_attempts(trials: list[TrialRecord]) -> list[TrialRecord]:
    """One trial per key: the latest attempt (a retry resumes the same run dir), in trial order."""
    latest: dict[Any, TrialRecord] = {}
    for t in trials:
        k = t.key if t.key is not None else ("#", t.number)  # search trials get their key when claimed
        if k not in latest or (t.attempt, t.number) > (latest[k].attempt, latest[k].number):
            latest[k] = t
    return sorted(latest.values(), key=lambda t: t.number)


def sweep_runs(study: SweepStudy) -> pd.DataFrame:
    """One row per trial key of a sweep: its state, parameters (grid axis labels, or search values by
    config path), seed, Optuna objective value, and the run dir's summary columns."""
    spec = study.spec
    # waiting grid trials carry their point only as fixed params Optuna hides until claimed: use the key
    by_key = {trial_key(spec.name, p, s): (p, s) for p in spec.grid_points() for s in spec.seeds}
    rows = []
    for t in _latest_attempts(study.trials()):
        params, seed = (t.params, t.seed) if t.params or t.key not in by_key else by_key[t.key]
        run_dir = t.run_dir
        row: dict[str, Any] = {
            "sweep": spec.name,
            "key": t.key,
            "number": t.number,
            "attempt": t.attempt,
            "state": _TRIAL_STATE[t.state],
            "reason": t.reason,
            **params,
            "seed": seed,
            "value": t.value,
            "run_dir": str(run_dir) if run_dir is not None else None,
        }
        summary = summary_columns(run_dir) if run_dir is not None else {}
        if row["reason"] is None and summary.get("reason"):
            row["reason"] = summary["reason"]
        row.update({k: v for k, v in summary.items() if k != "reason"})
        rows.append(row)
    return pd.DataFrame(rows)


def load_runs(path_or_sweep: str | Path, root: Path | None = None) -> pd.DataFrame:
    """One row per run: a sweep (its directory, or its name under `root`) via its study, or every run
    dir below a plain path. Columns: state, reason, seed, parameters, `final/`, `best/`, eval metrics,
    epochs_run, wall_time_s, run_dir (see `summary_columns`)."""
    sweep_dir = sweep_dir_of(path_or_sweep, root)
    if sweep_dir is not None:
        return sweep_runs(SweepStudy.open(sweep_dir))
    path = Path(path_or_sweep)
    if not path.exists():
        where = Path(root or default_root()) / "sweeps"
        raise ValueError(f"{path}: neither a run directory nor a sweep under {where}")
    return _plain_runs(path)


def _history_of(run_dir: Path) -> pd.DataFrame | None:
    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.is_file():
        return None
    wide = pd.DataFrame([json.loads(line) for line in metrics.read_text().splitlines() if line.strip()])
    if wide.empty:
        return None
    long = wide.melt(id_vars=["epoch"], var_name="metric", value_name="value")
    long.insert(0, "run_dir", str(run_dir))
    return long


def load_history(
    path_or_sweep: str | Path | None = None, root: Path | None = None, runs: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Long format: run_dir, epoch, metric, value - one row per logged number, for learning curves.

    Give a path or sweep (as `load_runs`), or the `runs` of `load_runs` to read exactly their run dirs
    (join back on run_dir)."""
    if runs is None:
        if path_or_sweep is None:
            raise ValueError("load_history: give a path, a sweep or the runs to read")
        runs = load_runs(path_or_sweep, root)
    dirs = runs["run_dir"].dropna() if "run_dir" in runs else []
    frames = [f for f in (_history_of(Path(d)) for d in dirs) if f is not None]
    columns = ["run_dir", "epoch", "metric", "value"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
