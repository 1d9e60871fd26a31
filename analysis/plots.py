"""Figures of a sweep: ablation bars with bootstrap CIs, learning curves per group with a CI band over
seeds, and for search sweeps the optimisation history and parameter importances. PNG, written
atomically (a reader never sees half a file), matplotlib only (Optuna's own plots need plotly)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from analysis.stats import MIN_BOOTSTRAP_N, Ranking, group_label, mean_ci
from core.train.plots import _save as save_figure


def slug(metric: str) -> str:
    """A metric name as a file name part: val/ogpe_action -> val_ogpe_action."""
    return metric.replace("/", "_").replace(".", "_")


def ablation_bars(table: pd.DataFrame, runs: pd.DataFrame, path: Path) -> Path:
    """Mean of `table.attrs['metric']` per group (bar) with its 95% bootstrap CI (error bar), every
    complete run as a dot; the best group's bar is blue."""
    by, metric = table.attrs["by"], table.attrs["metric"]
    labels = [group_label(k, by) for k in table[by].itertuples(index=False, name=None)]
    x = np.arange(len(table))
    mean = table["mean"].to_numpy(dtype=np.float64)
    yerr = np.stack([mean - table["ci_low"].to_numpy(float), table["ci_high"].to_numpy(float) - mean])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(table) + 2), 4.5))
    colors = ["tab:blue" if best else "tab:gray" for best in table["best"]]
    ax.bar(x, np.nan_to_num(mean), color=colors, alpha=0.6)
    complete = runs[(runs["state"] == "complete") & runs[metric].notna()]
    index = {k: i for i, k in enumerate(table[by].itertuples(index=False, name=None))}
    xs = np.array([index[k] for k in complete[by].itertuples(index=False, name=None)], dtype=np.float64)
    rank = complete.groupby(by, sort=False).cumcount().to_numpy()  # spread each group's dots evenly
    size = complete.groupby(by, sort=False)[metric].transform("size").to_numpy()
    jitter = np.where(size > 1, rank / np.maximum(size - 1, 1) - 0.5, 0.0) * 0.5
    ax.scatter(xs + jitter, complete[metric], color="black", alpha=0.5, s=12, zorder=3, label="runs (seeds)")
    ax.errorbar(
        x, mean, yerr=yerr, fmt="none", ecolor="black", elinewidth=2, capsize=8, zorder=4, label="95% CI"
    )
    ax.set_xticks(x, labels, rotation=30 if len(table) > 4 else 0, ha="right" if len(table) > 4 else "center")
    direction = table.attrs.get("direction", "minimize")
    ax.set(ylabel=metric, title=f"{metric} ({direction})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, Path(path))


def learning_curves(
    runs: pd.DataFrame, history: pd.DataFrame, by: list[str], metric: str, path: Path
) -> Path:
    """`metric` per epoch, mean over the complete runs of each group and its 95% CI band (bootstrap; a
    t-interval below MIN_BOOTSTRAP_N runs, see stats.mean_ci).

    A group's curve stops at its shortest run, so that every point averages the same runs."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves = history[history["metric"] == metric].pivot_table(
        index="run_dir", columns="epoch", values="value"
    )
    complete = runs[(runs["state"] == "complete") & runs["run_dir"].isin(curves.index)]
    for key, group in complete.groupby(by, sort=False):
        values = curves.loc[group["run_dir"]].to_numpy(dtype=np.float64)  # (runs, epochs)
        length = int(np.argmax(np.isnan(values).any(axis=0))) if np.isnan(values).any() else values.shape[1]
        values = values[:, :length]
        epochs = curves.columns.to_numpy()[:length] + 1
        line = ax.plot(epochs, values.mean(axis=0), label=f"{group_label(key, by)} (n={len(values)})")
        low, high = mean_ci(values)
        ax.fill_between(epochs, low, high, color=line[0].get_color(), alpha=0.2)
    ax.set(
        xlabel="epoch",
        ylabel=metric,
        title=f"{metric}: mean over seeds, 95% CI (t below {MIN_BOOTSTRAP_N} runs)",
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return save_figure(fig, Path(path))


def optimisation_history(runs: pd.DataFrame, direction: str, metric: str, path: Path) -> Path:
    """Objective value of every complete (and pruned) trial by trial number, and the best so far."""
    done = runs[(runs["state"] == "complete") & runs["value"].notna()].sort_values("number")
    number, value = done["number"].to_numpy(), done["value"].to_numpy(dtype=np.float64)
    best = np.minimum.accumulate(value) if direction == "minimize" else np.maximum.accumulate(value)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(number, value, s=18, color="tab:blue", label="trial")
    ax.step(number, best, where="post", color="tab:red", label="best so far")
    pruned = runs[(runs["state"] == "pruned") & runs["value"].notna()]  # value: the last one reported
    if len(pruned):
        ax.scatter(pruned["number"], pruned["value"], s=14, marker="x", color="tab:gray", label="pruned")
    ax.set(xlabel="trial", ylabel=metric, title=f"optimisation history ({direction})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, Path(path))


def importance_bars(importances: dict[str, float], evaluator: str, path: Path) -> Path:
    """Parameter importances, largest on top."""
    items = sorted(importances.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(items) + 1.5))
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue", alpha=0.8)
    ax.set(xlabel="importance", title=f"parameter importances ({evaluator})")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def ranking_plot(ranking: Ranking, title: str, path: Path) -> Path:
    """A critical-difference diagram (Demsar 2006): groups on an axis of mean rank (1 = best, left),
    half labelled on each side; a thick bar joins groups of which no two differ (Wilcoxon, Holm)."""
    groups, ranks = ranking.ranks["group"].tolist(), ranking.ranks["mean_rank"].to_numpy(float)
    k = len(groups)
    half = (k + 1) // 2
    fig, ax = plt.subplots(figsize=(8, 1.8 + 0.4 * half))
    margin = max(1.5, 0.35 * k)  # room for the labels on both sides
    ax.set_xlim(1 - margin, k + margin)
    ax.set_ylim(-(half + 0.6), 1.2)
    ax.axis("off")
    ax.hlines(0, 1, k, color="black")
    for r in range(1, k + 1):
        ax.vlines(r, 0, 0.15, color="black")
        ax.text(r, 0.3, str(r), ha="center", va="bottom")
    for i, (group, rank) in enumerate(zip(groups, ranks, strict=True)):
        left = i < half
        level = -(i + 1) if left else -(k - i)
        end = 0.7 if left else k + 0.3
        ax.plot([rank, rank, end], [0, level, level], color="black", lw=1)
        ax.text(end, level, f"{group} ({rank:.2f})", ha="right" if left else "left", va="center", fontsize=9)
    index = {g: i for i, g in enumerate(groups)}
    for j, clique in enumerate(ranking.cliques):
        lo, hi = ranks[index[clique[0]]], ranks[index[clique[-1]]]
        y = -0.3 - 0.6 * j / max(len(ranking.cliques), 1)  # all bars above the first label
        ax.plot([lo - 0.03, hi + 0.03], [y, y], color="tab:red", lw=4, solid_capstyle="round")
    p = ranking.friedman_p
    ax.set_title(
        f"{title}\nmean rank over {ranking.n_blocks} blocks; Friedman p = {p:.3g}; bars: no pair differs "
        f"(Wilcoxon, Holm, alpha {ranking.alpha})",
        fontsize=9,
    )
    fig.tight_layout()
    return save_figure(fig, Path(path))
