"""Error bars and significance for ablations: per-group mean/median/IQM with a CI, paired tests over
shared seeds, Holm correction, which groups are statistically tied with the best, the probability of
improvement over a baseline, and a Friedman + Wilcoxon/Holm ranking of several methods.

Seeds pair runs: two methods trained with the same seed share data splits and initialisation, so a
paired test on per-seed differences removes that shared variance. Holm controls the family-wise error
over all comparisons of one table without Bonferroni's loss of power.

IQM, stratified bootstrap and probability of improvement follow rliable (Agarwal et al., NeurIPS 2021,
google-research/rliable `metrics.py`, `library.py`): a group's runs are split into tasks (the cells of
the grid axes a table leaves out: another dataset, head type, ...); IQM = 25% trimmed mean of all its
runs pooled; the bootstrap resamples runs within each task (the tasks stay fixed); P(X > Y) counts
ties as one half and is averaged over tasks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

N_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
ALPHA = 0.05
TESTS = ("wilcoxon", "ttest")
STATS = ("mean", "median", "iqm")
IQM_CUT = 0.25  # cut from each end: the interquartile mean
# Below this many runs a group gets no bootstrap CI. A percentile bootstrap of the mean of n normal runs
# is about mean +- 1.96 sqrt((n-1)/n) sem, while the exact interval is mean +- t(n-1) sem: its nominal
# 95% covers 60% (n=2), 75% (3), 81% (4), 85% (5) - and at n=2 it has 3 distinct resample means, so
# "0.2432 +- 0.0001" says nothing. 5 is where the interval is no longer grossly too narrow (the
# `test_min_bootstrap_n_is_where_the_percentile_bootstrap_stops_undercovering_badly` test computes these).
# Below it the mean gets a Student-t interval (exact for normal runs, honestly wide: n=2 gives +- 12.7
# sem); median and IQM, which have no such interval, get none. Tables mark these rows.
MIN_BOOTSTRAP_N = 5
CI_KINDS = ("bootstrap", "t", "none")
# vs_best verdicts: the best group, not distinguishable from it, significantly worse, too few shared seeds
VERDICTS = ("best", "tied", "worse", "undetermined")


def bootstrap_ci(
    values: np.ndarray, confidence: float = 0.95, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of the mean over axis 0 of `values` (n, ...) -> (low, high), each (...).

    All resamples are drawn at once: idx (n_resamples, n), so no loop over resamples; a fixed seed
    makes tables reproducible. NaN for n < 2 (one run has no spread to resample)."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    if n < 2:
        nan = np.full(values.shape[1:], np.nan)
        return nan, nan.copy()
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))  # (B, n)
    means = values[idx].mean(axis=1)  # (B, ...)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail], axis=0)
    return low, high


def _as_list(by: str | Sequence[str]) -> list[str]:
    return [by] if isinstance(by, str) else list(by)


def statistic(values: np.ndarray, stat: str, axis: int | None = None) -> np.ndarray | float:
    """mean, median or iqm (rliable's `aggregate_iqm`: scipy's 25% trimmed mean) of `values`."""
    if stat not in STATS:
        raise ValueError(f"unknown statistic {stat!r}; choose one of {', '.join(STATS)}")
    if stat == "iqm":
        return stats.trim_mean(values, IQM_CUT, axis=axis)
    return (np.mean if stat == "mean" else np.median)(values, axis=axis)


def stratified_bootstrap_ci(
    tasks: Sequence[np.ndarray],
    stat: str = "mean",
    confidence: float = 0.95,
    n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """Percentile CI of `stat` over all runs pooled, resampling runs with replacement within each task
    (rliable's StratifiedBootstrap: a task's runs stay in their task, the task set is fixed).

    `tasks`: one 1-d array of run values per task. One task and `mean` draw exactly what
    `bootstrap_ci` draws. Vectorised: per task idx (B, n_t); NaN for fewer than 2 runs in all."""
    tasks = [np.asarray(t, dtype=np.float64) for t in tasks if len(t)]
    if sum(len(t) for t in tasks) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    pooled = np.concatenate([t[rng.integers(0, len(t), size=(n_resamples, len(t)))] for t in tasks], axis=1)
    values = statistic(pooled, stat, axis=1)  # (B,)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def t_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """mean -+ t_{(1+c)/2, n-1} sem over axis 0 of `values` (n, ...): the exact CI of the mean of normal
    runs; NaN for n < 2."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        nan = np.full(x.shape[1:], np.nan)
        return nan, nan.copy()
    h = stats.t.ppf((1 + confidence) / 2, len(x) - 1) * x.std(ddof=1, axis=0) / np.sqrt(len(x))
    return x.mean(axis=0) - h, x.mean(axis=0) + h


def mean_ci(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """95% CI of the mean over axis 0 by the small-n rule: the bootstrap from MIN_BOOTSTRAP_N runs on,
    a t-interval below (learning-curve bands)."""
    return (bootstrap_ci if len(values) >= MIN_BOOTSTRAP_N else t_interval)(values)


def interval(tasks: Sequence[np.ndarray], stat: str = "mean") -> tuple[float, float, str]:
    """(low, high, kind) for `stat` of the runs in `tasks`: the stratified bootstrap from
    MIN_BOOTSTRAP_N runs on; below, a t-interval for the mean and none otherwise (see MIN_BOOTSTRAP_N)."""
    x = np.concatenate([np.asarray(t, dtype=np.float64) for t in tasks]) if len(tasks) else np.array([])
    if len(x) >= MIN_BOOTSTRAP_N:
        return (*stratified_bootstrap_ci(tasks, stat), "bootstrap")
    if stat == "mean" and len(x) >= 2:
        low, high = t_interval(x)
        return float(low), float(high), "t"
    return math.nan, math.nan, "none"


def _task_values(group: pd.DataFrame, metric: str, tasks: Sequence[str]) -> list[np.ndarray]:
    """The group's runs of `metric` split by the values of the `tasks` columns (one task if none)."""
    if not tasks:
        return [group[metric].to_numpy(dtype=np.float64)]
    return [g[metric].to_numpy(dtype=np.float64) for _, g in group.groupby(list(tasks), sort=False)]


def aggregate(
    df: pd.DataFrame, by: str | Sequence[str], metric: str, stat: str = "mean", tasks: Sequence[str] = ()
) -> pd.DataFrame:
    """Per group of `by`: n, mean, std (ddof=1), sem, the `stat` (median, iqm; mean is `mean`) and its
    95% CI (ci_low, ci_high) of `metric`, and which CI that is (`ci`: one of CI_KINDS, see `interval`).

    `tasks`: columns whose values split a group's runs into tasks for the stratified bootstrap. Rows with
    a NaN metric are left out; groups keep their first-appearance order."""
    by = _as_list(by)
    rows = []
    for key, group in df.dropna(subset=[metric]).groupby(by, sort=False):
        parts = _task_values(group, metric, tasks)
        x = np.concatenate(parts)
        n = len(x)
        std = x.std(ddof=1) if n > 1 else np.nan
        low, high, kind = interval(parts, stat)
        row = {**dict(zip(by, key, strict=True)), "n": n, "mean": x.mean(), "std": std}
        row.update({"sem": std / np.sqrt(n), stat: float(statistic(x, stat))})
        rows.append({**row, "ci_low": low, "ci_high": high, "ci": kind})
    stat_column = [] if stat == "mean" else [stat]
    return pd.DataFrame(
        rows, columns=[*by, "n", "mean", "std", "sem", *stat_column, "ci_low", "ci_high", "ci"]
    )


def probability_of_improvement(
    x_tasks: Sequence[np.ndarray], y_tasks: Sequence[np.ndarray], direction: str = "maximize"
) -> float:
    """P(X > Y) + P(X = Y) / 2 over all pairs of runs of one task, averaged over tasks (rliable's
    `probability_of_improvement`: the Mann-Whitney U of X vs Y over nx ny). `direction` minimize:
    improving is being lower. Task i of X is compared with task i of Y."""
    sign = -1.0 if direction == "minimize" else 1.0
    per_task = []
    for x, y in zip(x_tasks, y_tasks, strict=True):
        dx = sign * np.asarray(x, dtype=np.float64)[:, None] - sign * np.asarray(y, dtype=np.float64)[None, :]
        per_task.append(np.mean(dx > 0) + 0.5 * np.mean(dx == 0))
    return float(np.mean(per_task))


def improvement_ci(
    x_tasks: Sequence[np.ndarray],
    y_tasks: Sequence[np.ndarray],
    direction: str = "maximize",
    confidence: float = 0.95,
    n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """Percentile CI of `probability_of_improvement`, resampling X's and Y's runs independently within
    each task (rliable's StratifiedIndependentBootstrap). Vectorised over resamples: (B, nx, ny) per task."""
    sign = -1.0 if direction == "minimize" else 1.0
    rng = np.random.default_rng(seed)
    total = np.zeros(n_resamples)
    for x, y in zip(x_tasks, y_tasks, strict=True):
        x, y = sign * np.asarray(x, dtype=np.float64), sign * np.asarray(y, dtype=np.float64)
        xs = x[rng.integers(0, len(x), size=(n_resamples, len(x)))]  # (B, nx)
        ys = y[rng.integers(0, len(y), size=(n_resamples, len(y)))]  # (B, ny)
        d = xs[:, :, None] - ys[:, None, :]  # (B, nx, ny)
        total += (d > 0).mean(axis=(1, 2)) + 0.5 * (d == 0).mean(axis=(1, 2))
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(total / len(x_tasks), [tail, 100 - tail])
    return float(low), float(high)


def improvement_over(
    df: pd.DataFrame,
    by: str | Sequence[str],
    metric: str,
    baseline_label: str,
    direction: str = "minimize",
    tasks: Sequence[str] = (),
) -> pd.DataFrame:
    """Per group: the probability that one of its runs improves on one of the baseline's (p_improve,
    over the tasks both have) and its 95% stratified bootstrap CI (NaN below MIN_BOOTSTRAP_N runs on
    either side, and for the baseline itself)."""
    by = _as_list(by)
    data = df.dropna(subset=[metric])
    groups = {key: g for key, g in data.groupby(by, sort=False)}
    base_key = find_group(list(groups), by, baseline_label)
    columns = [*by, "p_improve", "p_improve_low", "p_improve_high"]

    def split(group: pd.DataFrame) -> dict[tuple, np.ndarray]:
        if not tasks:
            return {(): group[metric].to_numpy(dtype=np.float64)}
        return {
            k if isinstance(k, tuple) else (k,): g[metric].to_numpy(dtype=np.float64)
            for k, g in group.groupby(list(tasks), sort=False)
        }

    base = split(groups[base_key])
    rows = []
    for key, group in groups.items():
        row = dict(zip(by, key, strict=True))
        mine = split(group)
        shared = [t for t in mine if t in base]
        if key == base_key or not shared:
            rows.append({**row, "p_improve": np.nan, "p_improve_low": np.nan, "p_improve_high": np.nan})
            continue
        xs, ys = [mine[t] for t in shared], [base[t] for t in shared]
        p = probability_of_improvement(xs, ys, direction)
        enough = min(sum(map(len, xs)), sum(map(len, ys))) >= MIN_BOOTSTRAP_N
        low, high = improvement_ci(xs, ys, direction) if enough else (np.nan, np.nan)
        rows.append({**row, "p_improve": p, "p_improve_low": low, "p_improve_high": high})
    return pd.DataFrame(rows, columns=columns)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaN entries stay NaN and do not count in m).

    Sort ascending, multiply the i-th smallest (0-based) by (m - i), take the running maximum so the
    order is kept, clip at 1."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    if m == 0:
        return out
    order = valid[np.argsort(p[valid], kind="stable")]
    adjusted = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    out[order] = np.minimum(adjusted, 1.0)
    return out


def paired_p(a: np.ndarray, b: np.ndarray, test: str = "wilcoxon") -> float:
    """Two-sided p-value of a paired test of a vs b (same seeds, same order); 1.0 if they are equal.

    scipy warns and returns NaN (t-test) when every difference is 0; that is no evidence of a
    difference, so p = 1."""
    if test not in TESTS:
        raise ValueError(f"unknown test {test!r}; choose one of {', '.join(TESTS)}")
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if np.all(a == b):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # small-sample precision notes from scipy
        result = stats.wilcoxon(a, b) if test == "wilcoxon" else stats.ttest_rel(a, b)
    return float(result.pvalue)


def group_label(key: tuple, by: Sequence[str]) -> str:
    """How a group is named in tables and on the command line: `value` for one axis, else
    `axis=value, axis=value`."""
    if len(by) == 1:
        return str(key[0])
    return ", ".join(f"{axis}={value}" for axis, value in zip(by, key, strict=True))


def find_group(keys: Sequence[tuple], by: Sequence[str], label: str) -> tuple:
    """The one group key that `label` names: comma-separated `axis=value` or bare values, each of which
    must match. ValueError listing the groups if none or several match."""
    tokens = [t.strip() for t in str(label).split(",") if t.strip()]

    def matches(key: tuple) -> bool:
        values = dict(zip(by, map(str, key), strict=True))
        for token in tokens:
            axis, sep, value = token.partition("=")
            if sep and axis.strip() in values:
                if values[axis.strip()] != value.strip():
                    return False
            elif token not in values.values():
                return False
        return True

    found = [k for k in keys if matches(k)]
    if len(found) != 1:
        names = "; ".join(group_label(k, by) for k in keys)
        what = "no group" if not found else f"{len(found)} groups"
        # e.g. the same cell run by two code versions (`ablate resume --code current`)
        hint = "; name one with axis=value, e.g. 'code=<hash>'" if len(found) > 1 else ""
        raise ValueError(f"baseline {label!r}: {what} match{hint} (groups: {names})")
    return found[0]


def _seed_matrix(
    df: pd.DataFrame, by: list[str], metric: str, pair_on: Sequence[str] = ("seed",)
) -> tuple[list[tuple], np.ndarray]:
    """Group keys (first-appearance order) and their (G, P) matrix of `metric` per pairing cell (a seed,
    or a seed and the values of axes left out of `by`; NaN where a group lacks a cell), averaged over
    runs that share group and cell."""
    pair_on = list(pair_on)
    data = df.dropna(subset=[metric])
    keys = list(dict.fromkeys(data[by].itertuples(index=False, name=None)))
    cells = list(dict.fromkeys(data[pair_on].itertuples(index=False, name=None)))
    cell = data.groupby([*by, *pair_on], sort=False)[metric].mean()
    matrix = np.full((len(keys), len(cells)), np.nan)
    rows = {k: i for i, k in enumerate(keys)}
    cols = {c: j for j, c in enumerate(cells)}
    for index, value in cell.items():
        matrix[rows[tuple(index[: len(by)])], cols[tuple(index[len(by) :])]] = value
    return keys, matrix


def _versus(keys: list[tuple], matrix: np.ndarray, ref: tuple, test: str) -> pd.DataFrame:
    """Every group vs the `ref` group over their shared seeds: n_pairs, mean delta, p (NaN below 2
    pairs, and for `ref` itself)."""
    rows = []
    base = matrix[keys.index(ref)]
    for key, values in zip(keys, matrix, strict=True):
        shared = ~np.isnan(values) & ~np.isnan(base)
        n = int(shared.sum())
        if key == ref:
            rows.append({"n_pairs": n, "delta": np.nan, "p": np.nan})
            continue
        delta = float((values[shared] - base[shared]).mean()) if n else np.nan
        p = paired_p(values[shared], base[shared], test) if n >= 2 else np.nan
        rows.append({"n_pairs": n, "delta": delta, "p": p})
    return pd.DataFrame(rows)


def paired_tests(
    df: pd.DataFrame,
    by: str | Sequence[str],
    metric: str,
    baseline_label: str | None = None,
    test: str = "wilcoxon",
    direction: str = "minimize",
    alpha: float = ALPHA,
    pair_on: Sequence[str] = ("seed",),
    stat: str = "mean",
) -> pd.DataFrame:
    """Per group: the paired comparison with the baseline and with the best group (the best `stat` of
    its pairing cells).

    Runs are paired by seed; when `by` leaves out an axis, a group's value for a seed is the mean over
    that axis (the marginal effect of the axes in `by`), unless `pair_on` names that axis too: then runs
    are paired by (seed, axis value), a blocked design with one pair per cell (3 seeds x 6 cells of the
    other axes = 18 pairs instead of 3: a Wilcoxon test of 3 pairs can never reach p < 0.25).

    Columns: `by`..., baseline (the row is the baseline), n_pairs, delta (mean of group - baseline over
    shared seeds), p, p_holm (vs the baseline, Holm over all groups compared with it; NaN without a
    baseline, for the baseline itself, or with < 2 shared seeds),
    best (the best mean by `direction`), p_vs_best, p_vs_best_holm, vs_best (one of VERDICTS: tied when
    the Holm-adjusted p >= alpha, undetermined with < 2 seeds shared with the best)."""
    by = _as_list(by)
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction {direction!r}: expected minimize or maximize")
    if test not in TESTS:
        raise ValueError(f"unknown test {test!r}; choose one of {', '.join(TESTS)}")
    keys, matrix = _seed_matrix(df, by, metric, pair_on)
    columns = [*by, "baseline", "n_pairs", "delta", "p", "p_holm", "best", "p_vs_best", "p_vs_best_holm"]
    columns.append("vs_best")
    if not keys:
        return pd.DataFrame(columns=columns)
    if baseline_label is not None:
        base = find_group(keys, by, baseline_label)
        vs_base = _versus(keys, matrix, base, test)
        out = vs_base.assign(p_holm=holm(vs_base["p"]), baseline=[k == base for k in keys])
    else:
        out = pd.DataFrame(np.nan, index=range(len(keys)), columns=["n_pairs", "delta", "p", "p_holm"])
        out["baseline"] = False
    scores = np.array([statistic(row[~np.isnan(row)], stat) for row in matrix])  # every group has a cell
    best = keys[int(np.argmin(scores) if direction == "minimize" else np.argmax(scores))]
    vs_best = _versus(keys, matrix, best, test)
    p_best_holm = holm(vs_best["p"])
    verdict = np.where(
        vs_best["n_pairs"] < 2, "undetermined", np.where(p_best_holm >= alpha, "tied", "worse")
    )
    is_best = np.array([k == best for k in keys])
    out = out.assign(
        best=is_best,
        p_vs_best=vs_best["p"].to_numpy(),
        p_vs_best_holm=p_best_holm,
        vs_best=np.where(is_best, "best", verdict),
    )
    return pd.concat([pd.DataFrame(keys, columns=by), out], axis=1)[columns]


@dataclass(frozen=True)
class Ranking:
    """A Friedman + post-hoc ranking of groups over blocks (Demsar 2006, with Wilcoxon/Holm instead of
    Nemenyi as Benavoli et al. 2016 advise): mean rank per group (1 = best), the omnibus test, every
    pair's Wilcoxon p (raw and Holm-adjusted over all pairs) and the cliques: maximal runs of groups in
    rank order of which no two differ significantly (the bars of a critical-difference diagram)."""

    ranks: pd.DataFrame  # group, mean_rank; best first
    n_blocks: int
    friedman_statistic: float
    friedman_p: float
    pairwise: pd.DataFrame  # a, b, p, p_holm
    cliques: list[list[str]]
    alpha: float
    left_out: list[str]  # groups without a value in more than half of the blocks (not ranked)


def rank_groups(
    df: pd.DataFrame,
    by: str | Sequence[str],
    metrics: Sequence[str],
    direction: str = "minimize",
    pair_on: Sequence[str] = ("seed",),
    alpha: float = ALPHA,
) -> Ranking:
    """Rank the groups of `by` within each block - a pairing cell of `pair_on` (seed and the axes left
    out) of one of `metrics`, all taken in `direction` - and test the ranks. Blocks where a group has no
    value are dropped, after leaving out groups missing from more than half of them (`left_out`: a
    sweep still running). ValueError below 3 groups or 2 complete blocks (Friedman's minimum)."""
    by = _as_list(by)
    blocks, keys = [], None
    for metric in metrics:
        k, matrix = _seed_matrix(df, by, metric, pair_on)
        if keys is None:
            keys = k
        if k != keys:  # a group missing from one metric altogether: align by key
            matrix = np.array(
                [matrix[k.index(g)] if g in k else np.full(matrix.shape[1], np.nan) for g in keys]
            )
        blocks.append(matrix.T)  # (P, G)
    scores = np.concatenate(blocks) if blocks else np.empty((0, 0))
    labels = [group_label(k, by) for k in keys or []]
    # a group of a sweep still running may have a few cells only: ranking it would drop most blocks
    sparse = np.isnan(scores).mean(axis=0) > 0.5 if scores.size else np.zeros(len(labels), bool)
    left_out = [label for label, s in zip(labels, sparse, strict=True) if s]
    scores, labels = scores[:, ~sparse], [label for label, s in zip(labels, sparse, strict=True) if not s]
    scores = scores[~np.isnan(scores).any(axis=1)]  # (B, G) complete blocks
    if len(labels) < 3 or len(scores) < 2:
        raise ValueError(
            f"a ranking needs >= 3 groups and >= 2 blocks where all have a value; got {len(labels)} "
            f"groups, {len(scores)} complete blocks"
        )
    signed = scores if direction == "minimize" else -scores
    mean_rank = stats.rankdata(signed, axis=1).mean(axis=0)  # ties share their mean rank
    friedman = stats.friedmanchisquare(*scores.T)
    order = np.argsort(mean_rank, kind="stable")
    pairs = [(i, j) for a, i in enumerate(order) for j in order[a + 1 :]]
    p = np.array([paired_p(scores[:, i], scores[:, j]) for i, j in pairs])
    p_holm = holm(p)
    differ = {frozenset((i, j)) for (i, j), q in zip(pairs, p_holm, strict=True) if q < alpha}
    spans = []
    for a in range(len(order)):
        b = a
        while b + 1 < len(order) and all(
            frozenset((order[c], order[b + 1])) not in differ for c in range(a, b + 1)
        ):
            b += 1
        if b > a and not any(s <= a and b <= e for s, e in spans):
            spans.append((a, b))
    return Ranking(
        ranks=pd.DataFrame({"group": [labels[i] for i in order], "mean_rank": mean_rank[order]}),
        n_blocks=len(scores),
        friedman_statistic=float(friedman.statistic),
        friedman_p=float(friedman.pvalue),
        pairwise=pd.DataFrame(
            {"a": [labels[i] for i, _ in pairs], "b": [labels[j] for _, j in pairs], "p": p, "p_holm": p_holm}
        ),
        cliques=[[labels[order[c]] for c in range(a, b + 1)] for a, b in spans],
        alpha=alpha,
        left_out=left_out,
    )
