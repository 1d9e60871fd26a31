"""Run directories -> pandas: one row per run, and the long per-epoch history for curves.

Reads only the files a run leaves (summary.json, config.yaml, metrics.jsonl), so it works on a
laptop with a copy of `runs/` and no server; running and failed runs are rows too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf


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


def load_runs(path: str | Path) -> pd.DataFrame:
    """One row per run: status, reason, config values as `cfg.<path>` columns, best/final/test metrics."""
    rows = []
    for d in run_dirs(path):
        summary = json.loads((d / "summary.json").read_text())
        row = {
            "run_dir": str(d),
            "experiment": summary.get("experiment"),
            "status": summary.get("status"),
            "reason": summary.get("reason"),
            "epochs_run": summary.get("epochs_run", 0),
            "wall_time_s": summary.get("wall_time_s"),
            "git_commit": summary.get("environment", {}).get("git_commit"),
        }
        if (d / "config.yaml").exists():
            cfg = OmegaConf.to_container(OmegaConf.load(d / "config.yaml"))
            row.update({f"cfg.{k}": v for k, v in _flatten(cfg).items() if not isinstance(v, list)})
        row.update({f"best/{k}": v["value"] for k, v in summary.get("best", {}).items()})
        row.update({f"final/{k}": v for k, v in summary.get("final", {}).items()})
        row.update({k: v for k, v in summary.get("eval", {}).items() if "/" in k})
        rows.append(row)
    return pd.DataFrame(rows)


def load_history(path: str | Path) -> pd.DataFrame:
    """Long format: run_dir, epoch, metric, value - one row per logged number."""
    frames = []
    for d in run_dirs(path):
        metrics = d / "metrics.jsonl"
        if not metrics.exists():
            continue
        wide = pd.DataFrame([json.loads(line) for line in metrics.read_text().splitlines() if line.strip()])
        if wide.empty:
            continue
        long = wide.melt(id_vars=["epoch"], var_name="metric", value_name="value")
        long.insert(0, "run_dir", str(d))
        frames.append(long)
    columns = ["run_dir", "epoch", "metric", "value"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
