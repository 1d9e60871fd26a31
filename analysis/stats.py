"""Error bars and significance for ablations: per-group mean/std/sem/bootstrap CI, paired tests over
shared seeds, Holm correction, and which groups are statistically tied with the best.

Seeds pair runs: two methods trained with the same seed share data splits and initialisation, so a
paired test on per-seed differences removes that shared variance. Holm controls the family-wise error
over all comparisons of one table without Bonferroni's loss of power.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

N_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
ALPHA = 0.05
TESTS = ("wilcoxon", "ttest")
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


def aggregate(df: pd.DataFrame, by: str | Sequence[str], metric: str) -> pd.DataFrame:
    """Per group of `by`: n, mean, std (ddof=1), sem, 95% bootstrap CI (ci_low, ci_high) of `metric`.

    Rows with a NaN metric are left out; groups keep their first-appearance order."""
    by = _as_list(by)
    rows = []
    for key, group in df.dropna(subset=[metric]).groupby(by, sort=False):
        x = group[metric].to_numpy(dtype=np.float64)
        n = len(x)
        std = x.std(ddof=1) if n > 1 else np.nan
        low, high = bootstrap_ci(x)
        rows.append(
            {
                **dict(zip(by, key, strict=True)),
                "n": n,
                "mean": x.mean(),
                "std": std,
                "sem": std / np.sqrt(n),
                "ci_low": float(low),
                "ci_high": float(high),
            }
        )
    return pd.DataFrame(rows, columns=[*by, "n", "mean", "std", "sem", "ci_low", "ci_high"])


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
        raise ValueError(f"baseline {label!r}: {what} match (groups: {names})")
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
) -> pd.DataFrame:
    """Per group: the paired comparison with the baseline and with the best group.

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
    means = np.nanmean(matrix, axis=1)  # a group's mean over its seeds (every group has one)
    best = keys[int(np.nanargmin(means) if direction == "minimize" else np.nanargmax(means))]
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
