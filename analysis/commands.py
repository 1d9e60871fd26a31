"""`ablate table` and `ablate plot`: the analysis verbs as functions for the CLI to wire.

Both raise ValueError (SweepError is one) with a message for the user on bad input; the CLI maps it
to exit code 2.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import plots
from analysis.records import STATES, load_history, open_sweep, read_metrics, sweep_dir_of, sweep_runs
from analysis.stats import STATS, TESTS
from analysis.tables import FORMATS, ablation_table, param_importances, render, search_report
from core.provenance import run_code
from core.train.plots import plot_dual_losses
from sweepstate.spec import SweepSpec
from sweepstate.study import SweepStudy

METRIC_PREFIXES = ("final/", "best/", "val/", "test/", "train/")


def metric_columns(runs: pd.DataFrame) -> list[str]:
    return [c for c in runs.columns if c.startswith(METRIC_PREFIXES)]


def resolve_metric(runs: pd.DataFrame, metric: str | None, spec: SweepSpec) -> str:
    """The column a metric name means. Default: `final/<objective>` (the last epoch's value, which is
    what the sweep optimised), or the objective itself when only the final evaluation logs it (`test/...`).
    A name is taken as a column (`test/ogpe_action` is the eval of the best checkpoint) or else as
    `final/<name>`. Before any run wrote metrics the name is accepted as given."""
    candidates = [f"final/{spec.metric}", spec.metric] if metric is None else [metric, f"final/{metric}"]
    found = [c for c in candidates if c in runs.columns]
    if found:
        return found[0]
    available = metric_columns(runs)
    if not available:
        return candidates[0]
    raise ValueError(f"unknown metric {metric!r} in sweep {spec.name}; available: {', '.join(available)}")


def sweep_axes(spec: SweepSpec) -> list[str]:
    """The grid axes of a grid sweep, the searched config paths of a search sweep."""
    return [axis for axis, _ in spec.grid] if spec.mode == "grid" else [p.path for p in spec.params]


def _check_by(runs: pd.DataFrame, by: Sequence[str], spec: SweepSpec) -> list[str]:
    unknown = [b for b in by if b not in runs.columns or b in metric_columns(runs)]
    if unknown:
        what = "grid axes" if spec.mode == "grid" else "search params"
        raise ValueError(
            f"unknown axis {', '.join(map(repr, unknown))} in sweep {spec.name}; its {what}: "
            f"{', '.join(sweep_axes(spec))} (or any cfg.<path> column)"
        )
    return list(by)


def pair_on(spec: SweepSpec, runs: pd.DataFrame, groups: Sequence[str]) -> list[str]:
    """What pairs runs across groups: the seed and the grid axes left out of `groups`, which block the
    pairs (and are the tasks of the stratified bootstrap) instead of being averaged away."""
    left_out = (
        [a for a in sweep_axes(spec) if a not in groups and a in runs.columns] if spec.mode == "grid" else []
    )
    return ["seed", *left_out]


def headline(spec: SweepSpec, runs: pd.DataFrame, metric: str) -> str:
    """One line: the sweep, its mode, metric and direction, and its trials per state."""
    counts = Counter(runs["state"])
    states = ", ".join(f"{s} {counts.get(s, 0)}" for s in STATES)
    return f"sweep {spec.name} ({spec.mode}, {metric}, {spec.direction}): {len(runs)} trials: {states}"


def table_command(
    sweep: str,
    root: Path,
    by: list[str] | None,
    metric: str | None,
    fmt: str,
    baseline: str | None,
    test: str,
    stat: str = "mean",
    pool_code: bool = False,
) -> str:
    """The text `ablate table` prints: an ablation table of a grid sweep (or of a search sweep grouped
    `by` some params) of the `stat` (mean, median, iqm) over seeds, or a search sweep's top trials,
    importances and re-run sweep. Writes nothing. Trials that ran different code (`ablate resume
    --code current`) are rows of their own unless `pool_code`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if test not in TESTS:
        raise ValueError(f"unknown test {test!r}; choose one of {', '.join(TESTS)}")
    if stat not in STATS:
        raise ValueError(f"unknown statistic {stat!r}; choose one of {', '.join(STATS)}")
    study = open_sweep(sweep, root)
    spec, runs = study.spec, sweep_runs(study)
    column = resolve_metric(runs, metric, spec)
    if column not in runs.columns:  # nothing has finished yet
        runs = runs.assign(**{column: np.nan})
    if spec.mode == "search" and not by:
        body = search_report(study, runs, column, fmt)
    else:
        groups = _check_by(runs, by or sweep_axes(spec), spec)
        codes = [run_code(d) if isinstance(d, str) else None for d in runs.get("run_dir", [])]
        if not pool_code and len(set(codes) - {None}) > 1:
            # a trial that has not run yet has no code: "-", so that it still counts as waiting
            runs, groups = runs.assign(code=[c or "-" for c in codes]), [*groups, "code"]
        table = ablation_table(
            runs,
            groups,
            column,
            spec.direction,
            baseline,
            test,
            pair_on=pair_on(spec, runs, groups),
            stat=stat,
        )
        body = render(table, fmt)
    if fmt == "csv":
        return body
    return f"{'% ' if fmt == 'latex' else ''}{headline(spec, runs, column)}\n\n{body}"


def sweep_plots(study: SweepStudy) -> list[Path]:
    """Write the sweep's figures to `<sweep dir>/plots/`; returns their paths (none before a trial is
    complete). Grid: bars of the objective and of every test metric, learning curves of the objective.
    Search: optimisation history and parameter importances."""
    spec, runs = study.spec, sweep_runs(study)
    out = study.sweep_dir / "plots"
    if not (runs["state"] == "complete").any():
        return []
    if spec.mode == "search":
        paths = [
            plots.optimisation_history(runs, spec.direction, spec.metric, out / "optimisation_history.png")
        ]
        imp = param_importances(study)
        if imp is not None:
            paths.append(plots.importance_bars(*imp, out / "param_importances.png"))
        return paths
    axes = sweep_axes(spec)
    metrics = [f"final/{spec.metric}", *sorted(c for c in runs.columns if c.startswith("test/"))]
    paths = []
    for metric in (m for m in metrics if m in runs.columns):
        table = ablation_table(runs, axes, metric, spec.direction)
        paths.append(plots.ablation_bars(table, runs, out / f"ablation_{plots.slug(metric)}.png"))
    history = load_history(runs=runs)
    if (history["metric"] == spec.metric).any():
        path = out / f"curves_{plots.slug(spec.metric)}.png"
        paths.append(plots.learning_curves(runs, history, axes, spec.metric, path))
    return paths


def run_plots(run_dir: Path) -> list[Path]:
    """Every PNG of a run dir, after (re)drawing what its records allow. A progress run: the dual-loss
    curves from metrics.jsonl; the predicted-vs-true progress panels of each evaluated checkpoint
    (eval/<checkpoint>.json) need the model, so a missing one is drawn by evaluating that checkpoint again
    (core.train.run.evaluate_run: the run's own splits, the same numbers). Other families: the plots their
    training and evaluation drew."""
    run_dir = Path(run_dir)
    if json.loads((run_dir / "summary.json").read_text()).get("family") == "progress":
        history = read_metrics(run_dir)
        if history:
            plot_dual_losses(history, run_dir / "plots" / "dual_loss_comparison.png")
        from core.train.run import checkpoint_path, evaluate_run  # builds the model: torch, data

        for evaluated in sorted((run_dir / "eval").glob("*.json")):
            name = evaluated.stem
            if (
                not (run_dir / "plots" / f"progress_{name}.png").is_file()
                and checkpoint_path(run_dir, name).is_file()
            ):
                evaluate_run(run_dir, name)
    return sorted((run_dir / "plots").glob("*.png"))


def plot_command(target: str, root: Path) -> list[Path]:
    """`ablate plot SWEEP|RUN_DIR`: a sweep's figures (written to `runs/sweeps/<name>/plots/`), or a run
    dir's (`<run_dir>/plots/`, see `run_plots`); returns every path."""
    sweep_dir, path = sweep_dir_of(target, root), Path(target)
    if sweep_dir is None and (path / "summary.json").is_file():
        return run_plots(path)
    if sweep_dir is None and path.exists():
        raise ValueError(f"{target}: neither a run directory (no summary.json) nor a sweep directory")
    return sweep_plots(open_sweep(target, root))
