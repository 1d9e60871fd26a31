"""`ablate report SWEEP`: the whole result of a sweep as one file a person can mail - the question
(the sweep file), the ablation tables with CIs and tests, the ranking, the plots and learning curves,
the failures and why, what every trial ran (its overrides and config differences, seed, code,
versions), wall time and GPU-hours.

HTML (default) is one self-contained file: styles inline, figures base64 data URIs, no script and no
link to anything, so it opens offline and survives being attached. `--format md` writes Markdown with
the PNGs beside it. The figures and tables are the ones `ablate plot` and `ablate table` make.
"""

from __future__ import annotations

import base64
import html
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from analysis import plots
from analysis.commands import headline, pair_on, resolve_metric, sweep_axes, sweep_plots
from analysis.records import load_history, open_sweep, run_environment, sweep_runs
from analysis.stats import STATS, group_label, rank_groups
from analysis.tables import (
    ablation_table,
    param_importances,
    plain_table,
    render_html,
    render_markdown,
    rerun_sweep,
    top_trials,
)
from core.atomic import atomic_write_bytes, atomic_write_text
from sweepstate.storage import mask_secrets

FORMATS = ("html", "md")
MAX_BARS = 12  # more groups than this: bars per axis only (48 bars are unreadable and a 700 kB PNG)
MAX_CURVES = 8
MAX_TRIALS_LISTED = 500  # a table of every trial beyond this is not read; the CSV of `ablate table` is
CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; } h2 { border-bottom: 1px solid #eee; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.88em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 3px 8px; vertical-align: top; }
th { background: #f3f3f3; } td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f7f7f7; border: 1px solid #e3e3e3; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; border: 1px solid #eee; } figure { margin: 1em 0; }
figcaption, .legend { color: #555; font-size: 0.85em; }
"""


# ------------------------------------------------------------------------------------------ blocks
@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Table:
    """A table rendered for each format (the ablation tables have their own markup)."""

    html: str
    markdown: str


@dataclass(frozen=True)
class Figure:
    path: Path
    caption: str


Block = Text | Code | Table | Figure


def _frame_table(frame: pd.DataFrame) -> Table:
    return Table(plain_table(frame, "html"), plain_table(frame, "markdown"))


def _stat_table(table: pd.DataFrame) -> Table:
    return Table(render_html(table), render_markdown(table))


# ---------------------------------------------------------------------------------------- sections
def question(spec_path: str, sweep_dir: Path) -> list[Block]:
    """The sweep file as written (its comments state the question), else the saved spec; a storage
    password in either is masked (a report is mailed)."""
    path = Path(spec_path)
    if path.is_file():
        return [Text(f"sweep file {path}:"), Code(mask_secrets(path.read_text()))]
    saved = yaml.safe_dump(
        yaml.safe_load((sweep_dir / "sweep.json").read_text()),
        sort_keys=False,
        default_flow_style=None,
        width=100,
    )
    where = sweep_dir / "sweep.json"
    return [Text(f"{spec_path} is not here; the sweep as saved in {where}:"), Code(mask_secrets(saved))]


def ablation_sections(study, runs: pd.DataFrame, column: str, stat: str) -> list[Block]:
    """The ablation table over all axes, then per axis (the others block the pairs and are the
    bootstrap's tasks) with the first value as baseline, and the ranking of an axis over the others."""
    spec = study.spec
    axes = sweep_axes(spec)
    blocks: list[Block] = []
    groupings = [axes] + ([[a] for a in axes] if len(axes) > 1 else [])
    done = runs[(runs["state"] == "complete") & runs[column].notna()]
    for by in groupings:
        # the first group that has a result (the sweep file's first value, unless it has none yet)
        base = group_label(next(done[by].itertuples(index=False, name=None)), by) if len(done) else None
        table = ablation_table(
            runs, by, column, spec.direction, base, pair_on=pair_on(spec, runs, by), stat=stat
        )
        blocks += [Text(f"by {', '.join(by)} (baseline: {base})"), _stat_table(table)]
        if len(by) == 1 and len(axes) > 1 and runs[by[0]].nunique() >= 3:  # 2 groups: the table's test
            blocks += ranking_blocks(study, runs, by, column)
    return blocks


def search_sections(study, runs: pd.DataFrame, column: str) -> list[Block]:
    """A search sweep: its best trials, the parameter importances and the sweep that re-runs the best
    with fresh seeds (what `ablate table` prints for it)."""
    top = top_trials(study, runs, column)
    n_done = int((runs["state"] == "complete").sum())
    blocks: list[Block] = [Text(f"top {len(top)} of {n_done} complete trials by {column}"), _frame_table(top)]
    imp = param_importances(study)
    if imp is not None:
        ranked = pd.DataFrame(sorted(imp[0].items(), key=lambda kv: -kv[1]), columns=["param", "importance"])
        blocks += [Text(f"parameter importances ({imp[1]})"), _frame_table(ranked)]
    if len(top):
        name, text = rerun_sweep(study.spec, top)
        blocks += [
            Text(f"re-run the top {len(top)} with fresh seeds: save as sweeps/{name}.yaml"),
            Code(text),
        ]
    return blocks


def ranking_blocks(study, runs: pd.DataFrame, by: Sequence[str], column: str) -> list[Block]:
    """The Friedman + Wilcoxon/Holm ranking of the groups of `by` over the blocks the other axes and
    the seeds make, as a table and a critical-difference diagram (nothing below 3 groups)."""
    spec = study.spec
    complete = runs[runs["state"] == "complete"]
    try:
        ranking = rank_groups(complete, by, [column], spec.direction, pair_on(spec, runs, by))
    except ValueError as exc:
        return [Text(f"no ranking of {', '.join(by)}: {exc}")]
    slug = plots.slug(f"ranking_{'_'.join(by)}_{column}")
    path = plots.ranking_plot(
        ranking, f"{', '.join(by)}: {column}", study.sweep_dir / "report" / "figures" / f"{slug}.png"
    )
    cliques = "; ".join(" ~ ".join(c) for c in ranking.cliques) or "none"
    if ranking.left_out:
        cliques += f" (not ranked, missing from most blocks: {', '.join(ranking.left_out)})"
    text = (
        f"ranking of {', '.join(by)} by {column} over {ranking.n_blocks} blocks (seed x other axes): "
        f"Friedman chi2 = {ranking.friedman_statistic:.3g}, p = {ranking.friedman_p:.3g}; groups not "
        f"distinguishable (Wilcoxon, Holm, alpha {ranking.alpha}): {cliques}"
    )
    return [Text(text), _frame_table(ranking.ranks), Figure(path, f"critical-difference diagram of {by[0]}")]


def search_figures(study) -> list[Block]:
    return [Figure(p, p.stem.replace("_", " ")) for p in sweep_plots(study)]


def report_figures(study, runs: pd.DataFrame, column: str) -> list[Block]:
    """Bars of the objective per group of all axes (up to MAX_BARS groups) and per axis, and the
    learning curves of the objective (or of its val/ counterpart when only the final evaluation
    has it), grouped by the first axis when there are more than MAX_CURVES groups. `ablate plot` draws
    every test metric; a report keeps to what a reader can take in."""
    spec = study.spec
    if not (runs["state"] == "complete").any():
        return []
    axes = sweep_axes(spec)
    out = study.sweep_dir / "report" / "figures"
    figures: list[Block] = []
    groupings = ([axes] if runs.groupby(axes).ngroups <= MAX_BARS else []) + (
        [[a] for a in axes] if len(axes) > 1 else []
    )
    for by in groupings:
        table = ablation_table(runs, by, column, spec.direction, pair_on=pair_on(spec, runs, by))
        path = plots.ablation_bars(table, runs, out / f"bars_{plots.slug('_'.join(by))}.png")
        figures.append(Figure(path, f"{column} by {', '.join(by)}: mean and 95% CI, every run a dot"))
    history = load_history(runs=runs)
    name = spec.metric if (history["metric"] == spec.metric).any() else "val/" + spec.metric.split("/", 1)[-1]
    if (history["metric"] == name).any():
        by = axes if runs.groupby(axes).ngroups <= MAX_CURVES else axes[:1]
        path = plots.learning_curves(runs, history, by, name, out / f"curves_{plots.slug(name)}.png")
        figures.append(Figure(path, f"learning curves of {name} by {', '.join(by)}"))
    return figures


def failures(runs: pd.DataFrame, label: list[str]) -> list[Block]:
    failed = runs[runs["state"] == "failed"]
    if failed.empty:
        return [Text("no failed trial")]
    frame = pd.DataFrame(
        {
            "trial": failed["number"].astype(int),
            "group": [group_label(k, label) for k in failed[label].itertuples(index=False, name=None)],
            "seed": failed["seed"],
            "attempt": failed["attempt"],
            "reason": failed["reason"].fillna("(no reason recorded)"),
        }
    )
    return [Text(f"{len(failed)} failed trial(s)"), _frame_table(frame)]


def config_differences(runs: pd.DataFrame) -> pd.Series:
    """Per trial, the resolved config values (`cfg.*`, seed aside) that differ from the first trial's:
    what the trial changed, as `path=value`, from its own config.yaml."""
    cfg = [c for c in runs.columns if c.startswith("cfg.") and c != "cfg.seed"]
    if not cfg or runs.empty:
        return pd.Series([""] * len(runs), index=runs.index)
    varying = [c for c in cfg if runs[c].astype(str).nunique(dropna=False) > 1]
    base = runs.iloc[0]

    def differs(row: pd.Series) -> str:
        return ", ".join(f"{c[4:]}={row[c]}" for c in varying if str(row[c]) != str(base[c]))

    return runs.apply(differs, axis=1)


def trials_section(study, runs: pd.DataFrame, label: list[str]) -> list[Block]:
    spec = study.spec
    shown = runs.head(MAX_TRIALS_LISTED)
    params = [
        dict(zip(label, k, strict=True)) if spec.mode == "grid" else {}
        for k in shown[label].itertuples(index=False, name=None)
    ]
    frame = pd.DataFrame(
        {
            "trial": shown["number"].astype(int),
            "state": shown["state"],
            "group": [group_label(k, label) for k in shown[label].itertuples(index=False, name=None)],
            "seed": shown["seed"],
            "overrides": [
                " ".join(spec.trial_overrides(p, int(s))[len(spec.overrides) : -1]) if p and s == s else ""
                for p, s in zip(params, shown["seed"], strict=True)
            ],
            "config vs trial 0": config_differences(shown).to_numpy(),
            "commit": shown.get("git_commit", pd.Series(index=shown.index, dtype=object)).map(
                lambda c: c[:10] if isinstance(c, str) else "-"
            ),
            "wall (min)": shown.get("wall_time_s", pd.Series(np.nan, index=shown.index)) / 60,
            "GPU-h": shown.get("gpu_hours", pd.Series(np.nan, index=shown.index)),
        }
    )
    note = f" (the first {MAX_TRIALS_LISTED})" if len(runs) > MAX_TRIALS_LISTED else ""
    base = f"experiment {spec.experiment} with overrides {' '.join(spec.overrides) or '(none)'}"
    return [Text(f"every trial{note}: the base is {base}; a trial adds its overrides"), _frame_table(frame)]


def resources_section(runs: pd.DataFrame) -> list[Block]:
    wall = runs.get("wall_time_s", pd.Series(dtype=float))
    gpu = runs.get("gpu_hours", pd.Series(dtype=float))
    complete = runs["state"] == "complete"
    frame = pd.DataFrame(
        {
            "": ["all trials", "complete trials"],
            "trials": [len(runs), int(complete.sum())],
            "wall time (h)": [wall.sum() / 3600, wall[complete].sum() / 3600],
            "GPU-hours": [gpu.sum(min_count=1), gpu[complete].sum(min_count=1)],
        }
    )
    return [_frame_table(frame)]


def environment_section(runs: pd.DataFrame) -> list[Block]:
    """The code and versions the trials ran with, one row per distinct environment."""
    envs = []
    for run_dir in runs["run_dir"].dropna():
        env = run_environment(Path(run_dir))
        if env:
            packages = ", ".join(f"{k} {v}" for k, v in (env.get("packages") or {}).items() if v)
            envs.append(
                {
                    "commit": env.get("git_commit") or "-",
                    "dirty": env.get("git_dirty"),
                    "python": env.get("python"),
                    "packages": packages,
                }
            )
    if not envs:
        return [Text("no trial has recorded its environment yet")]
    frame = pd.DataFrame(envs).astype(str)
    counted = frame.value_counts(sort=False).rename("trials").reset_index()
    return [_frame_table(counted)]


def build(target: str, root: Path, stat: str = "mean") -> tuple[str, list[tuple[str, list[Block]]], Path]:
    """The report's title, its sections of blocks and the sweep dir; writes the figures to
    `<sweep dir>/plots/`."""
    if stat not in STATS:
        raise ValueError(f"unknown statistic {stat!r}; choose one of {', '.join(STATS)}")
    study = open_sweep(target, root)
    spec, runs = study.spec, sweep_runs(study)
    column = resolve_metric(runs, None, spec)
    if column not in runs.columns:
        runs = runs.assign(**{column: np.nan})
    label = [a for a in sweep_axes(spec) if a in runs.columns]
    sections: list[tuple[str, list[Block]]] = [("Question", question(spec.path, study.sweep_dir))]
    if spec.mode == "grid":
        sections.append((f"Results: {column}", ablation_sections(study, runs, column, stat)))
    else:
        sections.append((f"Results: {column}", search_sections(study, runs, column)))
    figures = report_figures(study, runs, column) if spec.mode == "grid" else search_figures(study)
    sections.append(("Plots and learning curves", figures or [Text("no complete trial yet")]))
    sections.append(("Failures", failures(runs, label)))
    sections.append(("Trials", trials_section(study, runs, label)))
    sections.append(("Wall time and GPU-hours", resources_section(runs)))
    sections.append(("Code and versions", environment_section(runs)))
    return headline(spec, runs, column), sections, study.sweep_dir


# --------------------------------------------------------------------------------------- rendering
def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_html_report(title: str, sections: list[tuple[str, list[Block]]]) -> str:
    """One HTML document with everything inline (no script, no external reference)."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for name, blocks in sections:
        out.append(f"<h2>{html.escape(name)}</h2>")
        for b in blocks:
            if isinstance(b, Text):
                out.append(f"<p>{html.escape(b.text)}</p>")
            elif isinstance(b, Code):
                out.append(f"<pre>{html.escape(b.text)}</pre>")
            elif isinstance(b, Table):
                out.append(b.html)
            else:
                caption = html.escape(b.caption)
                out.append(
                    f'<figure><img src="{_data_uri(b.path)}" alt="{caption}">'
                    f"<figcaption>{caption}</figcaption></figure>"
                )
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def render_markdown_report(title: str, sections: list[tuple[str, list[Block]]], folder: Path) -> str:
    """Markdown; each figure is copied into `folder` and linked by its file name."""
    out = [f"# {title}"]
    for name, blocks in sections:
        out.append(f"## {name}")
        for b in blocks:
            if isinstance(b, Text):
                out.append(b.text)
            elif isinstance(b, Code):
                out.append(f"```\n{b.text.rstrip()}\n```")
            elif isinstance(b, Table):
                out.append(b.markdown)
            else:
                if b.path.parent.resolve() != folder.resolve():
                    shutil.copyfile(b.path, folder / b.path.name)
                out.append(f"![{b.caption}]({b.path.name})")
    return "\n\n".join(out) + "\n"


def report_command(
    target: str, root: Path, fmt: str = "html", out: str | None = None, stat: str = "mean"
) -> Path:
    """Write the report of sweep `target` (default `<sweep dir>/report/report.<html|md>`); returns its
    path. ValueError for an unknown sweep, format or statistic (nothing written)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    title, sections, sweep_dir = build(target, root, stat)
    path = Path(out) if out else sweep_dir / "report" / f"report.{fmt}"
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "html":
        atomic_write_bytes(path, render_html_report(title, sections).encode("utf-8"))
    else:
        atomic_write_text(path, render_markdown_report(title, sections, path.parent))
    return path
