"""Run directories and sweeps -> pandas: one row per run or trial, and the long per-epoch history.

Reads only what runs leave on disk (summary.json, config.yaml, metrics.jsonl) and, for a sweep, its
Optuna study, so it works on a laptop with a copy of `runs/` and no server. Waiting, running and
failed trials are rows too (with NaN metrics), so a table of a sweep in progress counts them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from sweepstate.spec import SweepSpec, trial_key
from sweepstate.study import SweepStudy, TrialRecord

HISTORY_COLUMNS = ("run_dir", "epoch", "metric", "value")
# summary.json status / Optuna trial state -> the one state vocabulary of the tables
STATES = ("complete", "pruned", "failed", "running", "waiting")
RUN_STATUS = {"completed": "complete", "pruned": "pruned", "failed": "failed", "running": "running"}
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


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def run_gpus(summary: dict[str, Any], cfg: dict[str, Any] | None, allocated: int | None = None) -> float:
    """GPUs a run held: a SLURM allocation when it ran in one (billed whether used or not), else the GPUs
    its process trained on - `environment.gpus` of summary.json, or what `trainer.device` says (cuda: 1,
    cpu: 0; `auto`: 0 on a CPU-only torch build, else unknown, NaN)."""
    if allocated is not None:
        return float(allocated)
    env = summary.get("environment") or {}
    if env.get("gpus") is not None:
        return float(env["gpus"])
    device = str(((cfg or {}).get("trainer") or {}).get("device", "auto"))
    if device == "auto":
        return 0.0 if str((env.get("packages") or {}).get("torch")).endswith("+cpu") else math.nan
    return 1.0 if device.startswith("cuda") else 0.0


def record_columns(
    summary: dict[str, Any], cfg: dict[str, Any] | None, allocated_gpus: int | None = None
) -> dict[str, Any]:
    """The columns of one run from its summary.json-shaped record and resolved config (see
    `summary_columns`); wandb_export builds the same record from the server's copy of a run."""
    row: dict[str, Any] = {
        "experiment": summary.get("experiment"),
        "status": summary.get("status"),
        "epochs_run": summary.get("epochs_run", 0),
        "wall_time_s": summary.get("wall_time_s"),
        "git_commit": summary.get("environment", {}).get("git_commit"),
    }
    if summary.get("reason"):
        row["reason"] = summary["reason"]
    if cfg is not None:
        row.update({f"cfg.{k}": v for k, v in _flatten(cfg).items() if not isinstance(v, list)})
    for name, best in summary.get("best", {}).items():
        row[f"best/{name}"] = best["value"]
        row[f"best_epoch/{name}"] = best["epoch"]
    row.update({f"final/{k}": v for k, v in summary.get("final", {}).items()})
    row.update({k: v for k, v in summary.get("eval", {}).items() if "/" in k})
    gpus = run_gpus(summary, cfg, allocated_gpus)
    wall = row["wall_time_s"]
    row["gpus"] = gpus
    row["gpu_hours"] = gpus * wall / 3600.0 if wall is not None else math.nan
    return row


def summary_columns(run_dir: Path, allocated_gpus: int | None = None) -> dict[str, Any]:
    """What one run dir says about itself: status, config values as `cfg.<path>`, metrics, resources.

    Metric columns: `final/<m>` (last epoch), `best/<checkpoint>` (+ `best_epoch/<checkpoint>`), and the
    eval metrics of the best checkpoint under their own names (`val/...`, `test/...`). `gpus` (see
    `run_gpus`; `allocated_gpus`: the SLURM allocation of a sweep trial) and `gpu_hours` = gpus x wall
    time. Empty if the run has not written a summary yet."""
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").is_file():
        return {}
    config = run_dir / "config.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(config)) if config.is_file() else None
    return record_columns(_read_json(run_dir / "summary.json"), cfg, allocated_gpus)


def run_environment(run_dir: Path) -> dict[str, Any]:
    """What a run recorded about its code and machine (summary.json `environment`: git commit, dirty,
    python, host, package versions); empty before its summary exists."""
    summary = Path(run_dir) / "summary.json"
    return dict(_read_json(summary).get("environment") or {}) if summary.is_file() else {}


def worker_launchers(sweep_dir: Path) -> dict[str, str]:
    """Worker name -> launcher (local | slurm) of every worker submitted for a sweep, from its jobs.json
    (written by launchers/sweeps/local.py `record_jobs`)."""
    jobs = Path(sweep_dir) / "jobs.json"
    return {j["worker"]: j["launcher"] for j in _read_json(jobs)} if jobs.is_file() else {}


def allocated_gpus(spec: SweepSpec, launcher: str | None) -> int | None:
    """GPUs SLURM gave one worker of the sweep, or None for a local process: `gpus_per_task` x
    `tasks_per_node` (a worker is one array job on one node; with several tasks it trains each trial
    data parallel over all of them, so all their GPUs are billed to the trial). `launcher`: the
    worker's, None when unknown (the sweep's own launcher is assumed). The resources are the sweep's
    current ones (sweep.json)."""
    if (launcher or spec.launcher.get("name", "local")) != "slurm":
        return None
    slurm = spec.launcher.get("slurm") or {}
    return int(slurm.get("gpus_per_task", 0)) * int(slurm.get("tasks_per_node", 1))


def _plain_runs(path: Path) -> pd.DataFrame:
    rows: list[dict[str, Any]] = []
    specs: dict[Path, SweepSpec] = {}
    for d in run_dirs(path):
        sweep_dir = d.parent.parent
        in_sweep = d.parent.name == "trials" and (sweep_dir / "sweep.json").is_file()
        if in_sweep and sweep_dir not in specs:
            specs[sweep_dir] = SweepSpec.from_dict(_read_json(sweep_dir / "sweep.json"))
        gpus = allocated_gpus(specs[sweep_dir], None) if in_sweep else None  # the worker is not known here
        row: dict[str, Any] = {"run_dir": str(d), "reason": None, **summary_columns(d, gpus)}
        row["state"] = RUN_STATUS.get(row.get("status"), row.get("status"))
        row["seed"] = row.get("cfg.seed")
        if in_sweep:
            row["sweep"], row["key"] = sweep_dir.name, d.name
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
    launchers = worker_launchers(study.sweep_dir)
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
        gpus = allocated_gpus(spec, launchers.get(t.worker))
        summary = summary_columns(run_dir, gpus) if run_dir is not None else {}
        if row["reason"] is None and summary.get("reason"):
            row["reason"] = summary["reason"]
        row.update({k: v for k, v in summary.items() if k != "reason"})
        rows.append(row)
    return pd.DataFrame(rows)


def load_runs(path_or_sweep: str | Path, root: Path | None = None) -> pd.DataFrame:
    """One row per run: a sweep (its directory, or its name under `root`) via its study, or every run
    dir below a plain path. Columns: state, reason, seed, parameters, `final/`, `best/`, eval metrics,
    epochs_run, wall_time_s, gpus, gpu_hours, run_dir (see `summary_columns`)."""
    sweep_dir = sweep_dir_of(path_or_sweep, root)
    if sweep_dir is not None:
        return sweep_runs(SweepStudy.open(sweep_dir))
    path = Path(path_or_sweep)
    if not path.exists():
        where = Path(root or default_root()) / "sweeps"
        raise ValueError(f"{path}: neither a run directory nor a sweep under {where}")
    return _plain_runs(path)


def history_frame(records: list[dict[str, Any]], run_dir: str) -> pd.DataFrame | None:
    """One run's per-epoch records (dicts with an `epoch`) in the long format of `load_history`."""
    wide = pd.DataFrame(records)
    if wide.empty:
        return None
    long = wide.melt(id_vars=["epoch"], var_name="metric", value_name="value")
    long.insert(0, "run_dir", run_dir)
    return long


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch records of metrics.jsonl (none if the run has not logged an epoch yet)."""
    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.is_file():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


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
    frames = [f for f in (history_frame(read_metrics(Path(d)), str(d)) for d in dirs) if f is not None]
    return concat_history(frames)


def concat_history(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The per-run frames of `history_frame` as one (empty, with its columns, when there are none)."""
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(HISTORY_COLUMNS))
