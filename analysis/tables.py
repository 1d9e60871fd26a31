"""Result tables of a sweep: ablation tables with error bars and significance (markdown, CSV, LaTeX),
and for search sweeps the top trials, parameter importances and a sweep file that re-runs them.

Only COMPLETE trials enter the statistics; the others are counted per group, so a table of a sweep
that is still running or had failures is correct about what it is based on.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import yaml

from analysis.records import STATES
from analysis.stats import ALPHA, MIN_BOOTSTRAP_N, aggregate, improvement_over, paired_tests
from core.provenance import run_code
from sweepstate.spec import SweepSpec
from sweepstate.study import SweepStudy

FORMATS = ("markdown", "csv", "latex")
TOP_K = 5
FRESH_SEEDS = 6  # a two-sided Wilcoxon over n pairs cannot reach p < 0.05 below n = 6
COUNT_COLUMNS = tuple(f"n_{state}" for state in STATES)
ALWAYS_SHOWN = ("n_complete", "n_failed", "n_running")  # n_pruned, n_waiting: only when nonzero
_MARK = {"tied": "†", "undetermined": "?"}
SMALL_N = "‡"  # a row whose CI is not a bootstrap (fewer than MIN_BOOTSTRAP_N runs)
STAT_NAMES = {"mean": "mean", "median": "median", "iqm": "IQM"}
_PM = "\0"  # stands for ± until the format's own markup replaces it (no escaper touches NUL)


def ablation_table(
    runs: pd.DataFrame,
    by: Sequence[str],
    metric: str,
    direction: str = "minimize",
    baseline: str | None = None,
    test: str = "wilcoxon",
    alpha: float = ALPHA,
    pair_on: Sequence[str] = ("seed",),
    stat: str = "mean",
) -> pd.DataFrame:
    """One row per group of `by` (first-appearance order): trial counts per state, statistics of
    `metric` over the complete trials (`aggregate`: `stat` and its CI, stratified over the tasks that
    the `pair_on` columns other than the seed make), the paired tests (`paired_tests`, pairing runs on
    the `pair_on` columns) and, with a baseline, the probability of improving on it (`improvement_over`).

    The settings travel in `.attrs` (by, metric, direction, baseline, test, alpha, stat) for the
    renderers."""
    by = list(by)
    missing = [c for c in [*by, metric, "state", "seed"] if c not in runs.columns]
    if missing:
        raise ValueError(f"no column {', '.join(missing)} in the runs (columns: {', '.join(runs.columns)})")
    counts = runs.groupby(by, sort=False)["state"].value_counts().unstack(fill_value=0)
    counts = counts.reindex(columns=list(STATES), fill_value=0).set_axis(list(COUNT_COLUMNS), axis=1)
    counts = counts.reset_index()
    complete = runs[runs["state"] == "complete"]
    tasks = [c for c in pair_on if c != "seed"]
    table = counts.merge(aggregate(complete, by, metric, stat, tasks), on=by, how="left")
    table = table.merge(
        paired_tests(complete, by, metric, baseline, test, direction, alpha, pair_on, stat), on=by, how="left"
    )
    if baseline is not None and complete[metric].notna().any():
        table = table.merge(
            improvement_over(complete, by, metric, baseline, direction, tasks), on=by, how="left"
        )
    table["n"] = table["n"].fillna(0).astype(int)
    table[["best", "baseline"]] = table[["best", "baseline"]].fillna(False).astype(bool)
    table.attrs.update(
        by=by,
        metric=metric,
        direction=direction,
        baseline=baseline,
        test=test,
        alpha=alpha,
        pair_on=list(pair_on),
        stat=stat,
    )
    return table


# ---------------------------------------------------------------------------------------- formatting
def _decimals(halfwidth: float) -> int:
    """Decimals that show the CI half-width to two significant digits (4 without a CI)."""
    if not math.isfinite(halfwidth) or halfwidth <= 0:
        return 4
    return int(min(max(1 - math.floor(math.log10(halfwidth)), 0), 8))


def format_mean_ci(mean: float, low: float, high: float, pm: str = "±") -> str:
    """`mean ± h`, h the larger distance from the mean to a bound of the (asymmetric) bootstrap CI,
    so that mean ± h covers the CI; `-` when there is no mean, the bare mean when there is no CI."""
    if not math.isfinite(mean):
        return "-"
    h = max(mean - low, high - mean) if math.isfinite(low) and math.isfinite(high) else math.nan
    d = _decimals(h)
    return f"{mean:.{d}f}" if math.isnan(h) else f"{mean:.{d}f} {pm} {h:.{d}f}"


def _number(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float | np.floating):
        return f"{v:.{digits}g}"
    return str(v)


def _p(v: float) -> str:
    return "-" if not math.isfinite(v) else ("<0.001" if v < 0.001 else f"{v:.3f}")


def _cells(
    table: pd.DataFrame, escape: Callable[[str], str], bold: str, mark: dict[str, str], pm: str
) -> list[list[str]]:
    """Header + rows of the human-readable table: text through `escape`, then the format's own markup
    (`bold` with {} for the best value, `mark` per vs_best verdict, `pm` for ±)."""
    a = table.attrs
    by, metric, stat = a["by"], a["metric"], a.get("stat", "mean")
    counts = [c for c in COUNT_COLUMNS if c in ALWAYS_SHOWN or table[c].sum() > 0]
    header = [*by, f"{metric} ({STAT_NAMES[stat]} {_PM} 95% CI)", "std", *counts]
    improvement = a.get("baseline") is not None and "p_improve" in table
    if a.get("baseline") is not None:
        header += [f"delta vs {a['baseline']}", f"p ({a['test']}, Holm)"]
    if improvement:
        header.append(f"P(better than {a['baseline']})")
    rows = [[escape(c).replace(_PM, pm) for c in header]]
    for _, r in table.iterrows():
        value = escape(format_mean_ci(r[stat], r["ci_low"], r["ci_high"], _PM)).replace(_PM, pm)
        if _small_n(r):
            value += mark[SMALL_N]
        if r["best"]:
            value = bold.format(value)
        elif r["vs_best"] in mark:
            value += mark[r["vs_best"]]
        row = [escape(str(r[c])) for c in by] + [value, _number(r["std"])] + [str(int(r[c])) for c in counts]
        if a.get("baseline") is not None:
            row += ["(baseline)", "-"] if r["baseline"] else [_number(r["delta"]), _p(r["p_holm"])]
        if improvement:
            row.append("-" if r["baseline"] else _probability(r))
        rows.append(row)
    return rows


def _small_n(r: pd.Series) -> bool:
    """A row with at least 2 runs whose CI is not a bootstrap (see stats.MIN_BOOTSTRAP_N)."""
    return r["n"] >= 2 and r["ci"] != "bootstrap"


def _probability(r: pd.Series) -> str:
    """`p [low, high]` of the probability of improvement (the bare p without a CI)."""
    if not math.isfinite(r["p_improve"]):
        return "-"
    if not math.isfinite(r["p_improve_low"]):
        return f"{r['p_improve']:.2f}"
    return f"{r['p_improve']:.2f} [{r['p_improve_low']:.2f}, {r['p_improve_high']:.2f}]"


def _legend(table: pd.DataFrame, dagger: str = "†", ddagger: str = SMALL_N) -> str:
    a = table.attrs
    stat = a.get("stat", "mean")
    blocks = [c for c in a.get("pair_on", ["seed"]) if c != "seed"]
    over = f"shared (seed, {', '.join(blocks)}) cells" if blocks else "shared seeds"
    text = (
        f"bold: best {STAT_NAMES[stat]} ({a['direction']}); {dagger}: not significantly different from the "
        f"best (paired {a['test']} over {over}, Holm-adjusted p >= {a['alpha']}); ?: fewer than 2 pairs "
        "shared with the best. Statistics over complete trials only."
    )
    if stat == "iqm":
        text += " IQM: interquartile mean (25% trimmed mean of all runs, Agarwal et al. 2021)."
    if stat != "mean" or blocks:
        within = f"within each {', '.join(blocks)} task" if blocks else "over runs"
        text += f" CIs: percentile bootstrap stratified {within}."
    if any(_small_n(r) for _, r in table.iterrows()):
        instead = "a Student-t interval" if stat == "mean" else "no interval"
        text += (
            f" {ddagger}: fewer than {MIN_BOOTSTRAP_N} runs: {instead} instead of a bootstrap (a bootstrap "
            "of so few runs is far too narrow)."
        )
    if a.get("baseline") is not None and "p_improve" in table:
        text += (
            f" P(better than {a['baseline']}): probability that a run of the row improves on a run of the "
            "baseline, ties counted half, averaged over tasks (Agarwal et al. 2021), with its 95% stratified "
            "bootstrap CI."
        )
    return text


def _markdown(rows: list[list[str]], right: list[bool]) -> str:
    """A GitHub markdown table, padded so that it also reads as plain text."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(cells: list[str]) -> str:
        padded = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = "|".join("-" * (w + 1) + ":" if r else "-" * (w + 2) for w, r in zip(widths, right, strict=True))
    return "\n".join([line(rows[0]), f"|{rule}|", *map(line, rows[1:])])


def _booktabs(rows: list[list[str]], colspec: str) -> list[str]:
    body = [" & ".join(r) + r" \\" for r in rows]
    return [
        rf"\begin{{tabular}}{{{colspec}}}",
        r"\toprule",
        body[0],
        r"\midrule",
        *body[1:],
        r"\bottomrule",
        r"\end{tabular}",
    ]


def render_markdown(table: pd.DataFrame) -> str:
    """The table in markdown and its legend."""
    marks = {k: f" {v}" for k, v in _MARK.items()} | {SMALL_N: f" {SMALL_N}"}
    rows = _cells(table, lambda c: c.replace("|", "\\|"), "**{}**", marks, "±")
    n_by = len(table.attrs["by"])
    return _markdown(rows, [i >= n_by for i in range(len(rows[0]))]) + "\n\n" + _legend(table)


def render_html(table: pd.DataFrame) -> str:
    """The table as an HTML <table> (numbers right-aligned) and its legend, for the report."""
    marks = {k: f" {v}" for k, v in _MARK.items()} | {SMALL_N: f" {SMALL_N}"}
    rows = _cells(table, html.escape, "<b>{}</b>", marks, "±")
    n_by = len(table.attrs["by"])
    return html_table(rows, n_by) + f'\n<p class="legend">{html.escape(_legend(table))}</p>'


def html_table(rows: list[list[str]], n_left: int = 1) -> str:
    """Header + rows (already escaped) as an HTML table; columns from `n_left` on are right-aligned."""

    def line(cells: list[str], tag: str) -> str:
        return (
            "<tr>"
            + "".join(f"<{tag}{'' if i < n_left else ' class=num'}>{c}</{tag}>" for i, c in enumerate(cells))
            + "</tr>"
        )

    body = "\n".join(line(r, "td") for r in rows[1:])
    return f"<table>\n<thead>{line(rows[0], 'th')}</thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def render_csv(table: pd.DataFrame) -> str:
    """The table's raw numbers (every column, full precision) for scripts and spreadsheets."""
    return table.to_csv(index=False)


def latex_escape(text: str) -> str:
    """Text safe inside a LaTeX table cell."""
    out = text.replace("\\", r"\textbackslash{}")
    for ch in "&%$#_{}":
        out = out.replace(ch, "\\" + ch)
    return out.replace("~", r"\textasciitilde{}").replace("^", r"\textasciicircum{}")


def render_latex(table: pd.DataFrame, caption: str | None = None) -> str:
    r"""A booktabs tabular in a table float (needs \usepackage{booktabs}); the legend is the caption."""
    marks = {"tied": r"$^\dagger$", "undetermined": "$^?$", SMALL_N: r"$^\ddagger$"}
    rows = _cells(table, latex_escape, r"\textbf{{{}}}", marks, r"$\pm$")
    n_by = len(table.attrs["by"])
    legend = latex_escape(_legend(table, dagger="DAGGER", ddagger="DDAGGER"))
    caption = caption or legend.replace("DDAGGER", r"$^\ddagger$").replace("DAGGER", r"$^\dagger$")
    return "\n".join(
        [
            r"\begin{table}[t]",
            r"\centering",
            *_booktabs(rows, "l" * n_by + "r" * (len(rows[0]) - n_by)),
            rf"\caption{{{caption}}}",
            r"\end{table}",
        ]
    )


def render(table: pd.DataFrame, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return {"markdown": render_markdown, "csv": render_csv, "latex": render_latex}[fmt](table)


# ------------------------------------------------------------------------------------ search sweeps
def top_trials(study: SweepStudy, runs: pd.DataFrame, metric: str, k: int = TOP_K) -> pd.DataFrame:
    """The k best COMPLETE trials by `metric` (the sweep's direction): number, seed, metric, params,
    and the code each ran when the complete trials ran more than one (`ablate resume --code current`).

    Params come from the study (exact types: an int stays an int), not from the NaN-padded frame."""
    spec = study.spec
    done = runs[(runs["state"] == "complete") & runs[metric].notna()]
    codes = {
        int(r["number"]): run_code(Path(r["run_dir"])) if isinstance(r.get("run_dir"), str) else None
        for _, r in done.iterrows()
    }
    split_code = len(set(codes.values()) - {None}) > 1
    done = done.sort_values(metric, ascending=spec.direction == "minimize", kind="stable").head(k)
    params = {t.number: t.params for t in study.trials()}
    rows = [
        {
            "trial": int(r["number"]),
            "seed": r["seed"],
            metric: r[metric],
            **params[int(r["number"])],
            **({"code": codes[int(r["number"])] or "-"} if split_code else {}),
        }
        for _, r in done.iterrows()
    ]
    columns = ["trial", "seed", metric, *(p.path for p in spec.params), *(["code"] if split_code else [])]
    return pd.DataFrame(rows, columns=columns)


def param_importances(study: SweepStudy) -> tuple[dict[str, float], str] | None:
    """Optuna importances of the search params over the complete trials and the evaluator's name;
    None with fewer than 2 complete trials. fANOVA (Optuna's default) needs scikit-learn; without it
    PED-ANOVA, which needs nothing else."""
    ostudy = optuna.load_study(study_name=study.spec.name, storage=study.storage)
    if len(ostudy.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))) < 2:
        return None
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    except ImportError:
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    name = type(evaluator).__name__.removesuffix("ImportanceEvaluator")
    return dict(optuna.importance.get_param_importances(ostudy, evaluator=evaluator)), name


def rerun_sweep(spec: SweepSpec, top: pd.DataFrame, n_seeds: int = FRESH_SEEDS) -> tuple[str, str]:
    """(name, yaml text) of a grid sweep that re-runs the `top` configurations with fresh seeds, one
    named grid label per trial, so that `ablate table` can test them against each other."""
    name = f"{spec.name}_top{len(top)}"
    first_fresh = max(spec.seeds) + 1
    configs = {}
    for _, r in top.iterrows():
        params = {p.path: r[p.path] for p in spec.params}
        params = {k: v.item() if isinstance(v, np.generic) else v for k, v in params.items()}
        # the trial's own overrides minus the sweep's fixed ones and the seed
        configs[f"trial_{int(r['trial'])}"] = spec.trial_overrides(params, spec.seeds[0])[
            len(spec.overrides) : -1
        ]
    body = {
        "experiment": spec.experiment,
        "overrides": list(spec.overrides),
        "objective": {"metric": spec.metric, "direction": spec.direction},
        "seeds": list(range(first_fresh, first_fresh + n_seeds)),
        "grid": {"config": configs},
    }
    text = f"# sweeps/{name}.yaml: the top {len(top)} trials of sweep {spec.name} with fresh seeds\n"
    return name, text + yaml.safe_dump(body, sort_keys=False, default_flow_style=None, width=110)


def search_report(study: SweepStudy, runs: pd.DataFrame, metric: str, fmt: str, k: int = TOP_K) -> str:
    """Top-k trials, parameter importances and the re-run sweep, in `fmt` (csv: the top-k table only;
    latex: the prose as % comments, so that the output pastes into a document)."""
    top = top_trials(study, runs, metric, k)
    if fmt == "csv":
        return top.to_csv(index=False)
    if fmt == "latex":
        note = lambda text: "\n".join(f"% {line}" for line in text.splitlines())  # noqa: E731
    else:
        note = lambda text: text  # noqa: E731
    n_done = int((runs["state"] == "complete").sum())
    sections = [note(f"top {len(top)} of {n_done} complete trials by {metric}"), plain_table(top, fmt)]
    imp = param_importances(study)
    if imp is None:
        sections.append(note("parameter importances: need at least 2 complete trials"))
    else:
        ranked = pd.DataFrame(sorted(imp[0].items(), key=lambda kv: -kv[1]), columns=["param", "importance"])
        sections += [note(f"parameter importances ({imp[1]})"), plain_table(ranked, fmt)]
    if len(top):
        name, text = rerun_sweep(study.spec, top)
        how = f"re-run the top {len(top)} with fresh seeds: save as sweeps/{name}.yaml; ablate sweep {name}"
        sections.append(note(how + "\n" + text) if fmt == "latex" else f"{how}\n\n```yaml\n{text}```")
    return "\n\n".join(sections)


def plain_table(frame: pd.DataFrame, fmt: str) -> str:
    """A small table without statistics (top trials, importances, failures) in markdown, LaTeX
    booktabs or HTML."""
    rows = [list(map(str, frame.columns))] + [
        [_number(v, 4) for v in r] for r in frame.itertuples(index=False)
    ]
    if fmt == "html":
        return html_table([[html.escape(c) for c in r] for r in rows], n_left=len(rows[0]))
    if fmt == "latex":
        return "\n".join(_booktabs([[latex_escape(c) for c in r] for r in rows], "l" * len(rows[0])))
    return _markdown(rows, [False] * len(rows[0]))
