"""The statistics reviewers ask for, against hand-computed values and scipy: the small-n rule (no
bootstrap below stats.MIN_BOOTSTRAP_N runs), rliable's IQM, stratified bootstrap and probability of
improvement, the Friedman + Wilcoxon/Holm ranking, and the GPUs a data-parallel SLURM worker holds."""

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from optuna.trial import TrialState
from scipy import stats

from analysis.commands import table_command
from analysis.records import load_runs
from analysis.stats import (
    MIN_BOOTSTRAP_N,
    aggregate,
    bootstrap_ci,
    holm,
    improvement_ci,
    improvement_over,
    mean_ci,
    probability_of_improvement,
    rank_groups,
    statistic,
    stratified_bootstrap_ci,
    t_interval,
)
from analysis.tables import ablation_table, render_latex, render_markdown
from sweepstate.study import SweepStudy
from tests.test_analysis import CPU_TORCH, spec_of, with_resources, write_run


# ------------------------------------------------------------------------------------ small n
def test_min_bootstrap_n_is_where_the_percentile_bootstrap_stops_undercovering_badly():
    """A percentile bootstrap of the mean of n normal runs is ~ mean -+ 1.96 sqrt((n-1)/n) sem (the
    bootstrap's sd of the mean uses the plug-in variance); the exact interval uses t(n-1). Its real
    coverage of a nominal 95% is P(|T_{n-1}| < 1.96 sqrt((n-1)/n))."""
    coverage = {n: 1 - 2 * stats.t.sf(1.96 * math.sqrt((n - 1) / n), n - 1) for n in range(2, 11)}
    assert [round(coverage[n], 2) for n in (2, 3, 4, 5)] == [0.6, 0.75, 0.81, 0.85]
    assert min(n for n, c in coverage.items() if c >= 0.84) == MIN_BOOTSTRAP_N


def test_t_interval_equals_scipy():
    x = np.array([0.24307, 0.24329])
    low, high = t_interval(x)
    ref = stats.t.interval(0.95, 1, loc=x.mean(), scale=stats.sem(x))
    assert (low, high) == pytest.approx(ref, abs=1e-15)
    assert high - low == pytest.approx(2 * 12.7062 * stats.sem(x), rel=1e-4)  # t(0.975, 1) = 12.706
    assert all(math.isnan(v) for v in t_interval(x[:1]))


def _two_seed_frame() -> pd.DataFrame:
    """The issue's case: two seeds per method (a bootstrap of two numbers), and one method with six."""
    rows = [{"m": "two", "seed": s, "v": v} for s, v in enumerate([0.24307, 0.24329])]
    rows += [{"m": "six", "seed": s, "v": v} for s, v in enumerate([0.31, 0.35, 0.29, 0.40, 0.33, 0.37])]
    rows += [{"m": "one", "seed": 0, "v": 0.5}]
    return pd.DataFrame(rows)


def test_below_min_n_the_mean_gets_a_t_interval_and_median_iqm_none():
    df = _two_seed_frame()
    agg = aggregate(df, "m", "v").set_index("m")
    assert agg.loc["two", "ci"] == "t"
    assert (agg.loc["two", "ci_low"], agg.loc["two", "ci_high"]) == pytest.approx(
        stats.t.interval(0.95, 1, loc=0.24318, scale=0.00011), abs=1e-12
    )
    six = np.array([0.31, 0.35, 0.29, 0.40, 0.33, 0.37])
    assert agg.loc["six", "ci"] == "bootstrap"
    assert (agg.loc["six", "ci_low"], agg.loc["six", "ci_high"]) == pytest.approx(
        bootstrap_ci(six), abs=1e-15
    )
    assert agg.loc["one", "ci"] == "none" and math.isnan(agg.loc["one", "ci_low"])
    iqm = aggregate(df, "m", "v", stat="iqm").set_index("m")
    assert iqm.loc["two", "ci"] == "none" and math.isnan(iqm.loc["two", "ci_high"])
    assert iqm.loc["six", "iqm"] == pytest.approx(np.mean([0.33, 0.35, 0.31, 0.37]), abs=1e-15)


def test_small_n_rows_are_marked_and_the_legend_says_why():
    df = _two_seed_frame().assign(state="complete")
    table = ablation_table(df, ["m"], "v")
    md = render_markdown(table)
    two = next(line for line in md.splitlines() if line.startswith("| two"))
    six = next(line for line in md.splitlines() if line.startswith("| six"))
    one = next(line for line in md.splitlines() if line.startswith("| one"))
    # 0.24318 +- 12.706 * 0.00011 = +- 0.0014: the honest width, not the bootstrap's +- 0.00011
    assert "0.2432 ± 0.0014 ‡" in two and "‡" not in six and "‡" not in one
    assert "‡: fewer than 5 runs: a Student-t interval instead of a bootstrap" in md
    assert "‡" not in render_markdown(table[table["m"] == "six"].copy().__finalize__(table))
    assert r"$^\ddagger$" in render_latex(table)


# ---------------------------------------------------------------------------------------- rliable
def test_iqm_is_the_interquartile_mean_by_hand_and_scipy():
    x = np.array([8.0, 1, 7, 2, 6, 3, 5, 4])
    assert statistic(x, "iqm") == 4.5  # (3 + 4 + 5 + 6) / 4
    assert statistic(x[:6], "iqm") == pytest.approx((2 + 3 + 6 + 7) / 4)  # n=6: one cut from each end
    assert statistic(x, "iqm") == stats.trim_mean(x, 0.25)
    scores = np.arange(12.0).reshape(4, 3) ** 2  # (runs, tasks): rliable pools runs x tasks
    assert statistic(scores, "iqm") == pytest.approx(stats.trim_mean(scores, 0.25, axis=None))
    assert statistic(x, "median") == 4.5 and statistic(x, "mean") == 4.5
    with pytest.raises(ValueError, match="unknown statistic"):
        statistic(x, "mode")


def _slow_stratified(tasks, stat, n, seed):
    """A loop over resamples: runs drawn with replacement inside each task, pooled, the statistic."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        pooled = np.concatenate([rng.choice(t, size=len(t), replace=True) for t in tasks])
        values.append(statistic(pooled, stat))
    return np.percentile(values, [2.5, 97.5])


@pytest.mark.parametrize("stat", ["mean", "iqm", "median"])
def test_stratified_bootstrap_keeps_tasks_fixed_and_matches_a_loop(stat):
    rng = np.random.default_rng(3)
    tasks = [rng.normal(0, 1, 5), rng.normal(100, 1, 4), rng.normal(50, 1, 6)]
    low, high = stratified_bootstrap_ci(tasks, stat)
    ref = _slow_stratified(tasks, stat, 1500, seed=11)
    pooled = np.concatenate(tasks)
    assert low <= statistic(pooled, stat) <= high
    assert (low, high) == pytest.approx(tuple(ref), abs=0.35)
    if stat == "mean":
        # every resample keeps 5 runs near 0, 4 near 100, 6 near 50: the CI reflects within-task noise only
        assert high - low < 1.5
        assert np.subtract(*bootstrap_ci(pooled)[::-1]) > 20  # an unstratified bootstrap mixes tasks
    assert stratified_bootstrap_ci(tasks[:1]) == pytest.approx(bootstrap_ci(tasks[0]), abs=0)


def test_probability_of_improvement_by_hand_and_as_mann_whitney():
    x, y = np.array([1.0, 2, 3]), np.array([2.0, 2, 0])
    # x > y: 1>0; 2>0; 3>2,2,0 = 5 of 9 pairs; ties: 2=2 twice -> (5 + 2/2) / 9
    assert probability_of_improvement([x], [y]) == pytest.approx(6 / 9)
    u = stats.mannwhitneyu(x, y, alternative="greater").statistic / 9  # rliable's definition
    assert probability_of_improvement([x], [y]) == pytest.approx(u)
    x2, y2 = np.array([5.0, 6]), np.array([1.0, 7, 8])  # 2 of 6 pairs
    assert probability_of_improvement([x, x2], [y, y2]) == pytest.approx((6 / 9 + 2 / 6) / 2)
    assert probability_of_improvement([x], [y], "minimize") == pytest.approx(1 - 6 / 9)
    assert probability_of_improvement([x], [x]) == 0.5


def test_probability_of_improvement_ci_matches_an_independent_resampling_loop():
    rng = np.random.default_rng(4)
    xs = [rng.normal(0.3, 1, 6), rng.normal(5.3, 1, 5)]
    ys = [rng.normal(0.0, 1, 7), rng.normal(5.0, 1, 6)]
    low, high = improvement_ci(xs, ys)
    loop, r = [], np.random.default_rng(9)
    for _ in range(3000):
        bx = [r.choice(t, len(t)) for t in xs]
        by = [r.choice(t, len(t)) for t in ys]
        loop.append(probability_of_improvement(bx, by))
    assert low <= probability_of_improvement(xs, ys) <= high
    assert (low, high) == pytest.approx(tuple(np.percentile(loop, [2.5, 97.5])), abs=0.03)


def test_iqm_table_with_tasks_and_probability_of_improvement_over_the_baseline():
    rng = np.random.default_rng(0)
    rows = []
    for method, shift in (("base", 0.0), ("better", -0.3), ("same", 0.0)):
        for task, level in (("u", 1.0), ("v", 3.0)):
            for seed in range(4):
                v = level + shift + rng.normal(0, 0.1)
                rows.append({"method": method, "task": task, "seed": seed, "v": v, "state": "complete"})
    df = pd.DataFrame(rows)
    table = ablation_table(df, ["method"], "v", "minimize", "base", pair_on=["seed", "task"], stat="iqm")
    t = table.set_index("method")
    for m in ("base", "better", "same"):
        g = df[df["method"] == m]
        assert t.loc[m, "iqm"] == pytest.approx(stats.trim_mean(g["v"], 0.25))
        by_task = [g[g["task"] == k]["v"].to_numpy() for k in ("u", "v")]
        assert (t.loc[m, "ci_low"], t.loc[m, "ci_high"]) == pytest.approx(
            stratified_bootstrap_ci(by_task, "iqm"), abs=0
        )
    base = [df[(df["method"] == "base") & (df["task"] == k)]["v"].to_numpy() for k in ("u", "v")]
    better = [df[(df["method"] == "better") & (df["task"] == k)]["v"].to_numpy() for k in ("u", "v")]
    assert t.loc["better", "p_improve"] == pytest.approx(probability_of_improvement(better, base, "minimize"))
    assert t.loc["better", "p_improve"] == 1.0 and t.loc["better", "best"]
    assert 0.1 < t.loc["same", "p_improve"] < 0.9 and math.isnan(t.loc["base", "p_improve"])
    md = render_markdown(table)
    assert "v (IQM ± 95% CI)" in md and "P(better than base)" in md
    assert "stratified within each task task" in md
    better_row = next(line for line in md.splitlines() if line.startswith("| better"))
    assert "1.00 [1.00, 1.00]" in better_row
    direct = improvement_over(df, "method", "v", "base", "minimize", ["task"]).set_index("method")
    assert direct.loc["better", "p_improve"] == 1.0


def test_table_command_stat_iqm_and_median_on_a_sweep(tmp_path):
    from tests.test_analysis import build_grid_sweep, complete_values

    build_grid_sweep(tmp_path)
    out = table_command("abl", tmp_path, None, None, "markdown", "none", "wilcoxon", "iqm")
    assert "final/val/ogpe_action (IQM ± 95% CI)" in out and "P(better than none)" in out
    a = next(line for line in out.splitlines() if line.startswith("| a "))
    assert f"{stats.trim_mean(complete_values('a'), 0.25):.3f}" in a
    # a beats none on every one of its complete seeds' values: P = 1
    assert "1.00 [1.00, 1.00]" in a
    med = table_command("abl", tmp_path, None, None, "csv", None, "wilcoxon", "median")
    csv = pd.read_csv(__import__("io").StringIO(med)).set_index("method")
    assert csv.loc["a", "median"] == pytest.approx(np.median(complete_values("a")))
    with pytest.raises(ValueError, match="unknown statistic"):
        table_command("abl", tmp_path, None, None, "markdown", None, "wilcoxon", "mode")


# ------------------------------------------------------------------------------------- ranking
def test_ranking_equals_friedman_and_holm_adjusted_wilcoxon_of_scipy():
    rng = np.random.default_rng(1)
    n_blocks = 12
    level = {"a": 0.0, "b": 0.05, "c": 1.0, "d": 1.02}
    rows = [
        {"method": m, "seed": s, "task": t, "v": lv + 0.3 * t + rng.normal(0, 0.2)}
        for m, lv in level.items()
        for s in range(n_blocks // 2)
        for t in range(2)
    ]
    df = pd.DataFrame(rows)
    ranking = rank_groups(df, "method", ["v"], "minimize", pair_on=["seed", "task"])
    matrix = df.pivot_table(index=["seed", "task"], columns="method", values="v")[list(level)].to_numpy()
    ref = stats.friedmanchisquare(*matrix.T)
    assert ranking.n_blocks == n_blocks
    assert ranking.friedman_statistic == pytest.approx(ref.statistic) and ranking.friedman_p == pytest.approx(
        ref.pvalue
    )
    hand_ranks = np.argsort(np.argsort(matrix, axis=1), axis=1).mean(axis=0) + 1  # no ties in the data
    expected = dict(zip(level, hand_ranks, strict=True))
    assert dict(zip(ranking.ranks["group"], ranking.ranks["mean_rank"], strict=True)) == pytest.approx(
        expected
    )
    assert ranking.ranks["group"].tolist()[:2] in (["a", "b"], ["b", "a"])
    pairs = ranking.pairwise
    col = {m: i for i, m in enumerate(level)}
    p = [
        stats.wilcoxon(matrix[:, col[a]], matrix[:, col[b]]).pvalue
        for a, b in zip(pairs["a"], pairs["b"], strict=True)
    ]
    np.testing.assert_allclose(pairs["p"], p, atol=1e-12)
    np.testing.assert_allclose(pairs["p_holm"], holm(p), atol=1e-12)
    # a~b and c~d are ties (0.05 and 0.02 apart under noise 0.2); the two pairs differ (1.0 apart)
    assert sorted(map(sorted, ranking.cliques)) == [["a", "b"], ["c", "d"]]


def test_ranking_over_several_metrics_and_its_guards():
    df = pd.DataFrame(
        [{"m": m, "seed": s, "x": i + s, "y": 10 - i} for i, m in enumerate("pqr") for s in range(3)]
    )
    ranking = rank_groups(df, "m", ["x", "y"], "minimize")  # x ranks p<q<r, y ranks r<q<p
    assert ranking.n_blocks == 6
    assert ranking.ranks.set_index("group")["mean_rank"].to_dict() == {"q": 2.0, "p": 2.0, "r": 2.0}
    with pytest.raises(ValueError, match=">= 3 groups"):
        rank_groups(df[df["m"] != "r"], "m", ["x"])
    # a sweep still running: s has 1 of 3 seeds, so it is left out instead of dropping 2 of 3 blocks
    running = pd.concat([df, pd.DataFrame([{"m": "s", "seed": 0, "x": 9, "y": 9}])])
    partial = rank_groups(running, "m", ["x"])
    assert partial.left_out == ["s"] and partial.n_blocks == 3 and ranking.left_out == []
    assert partial.ranks["group"].tolist() == ["p", "q", "r"]


# ---------------------------------------------------------------------------------------- GPUs
def test_gpu_hours_of_a_data_parallel_slurm_worker_count_every_task(tmp_path):
    slurm = {"name": "slurm", "slurm": {"gpus_per_task": 2, "tasks_per_node": 4, "time": "01:00:00"}}
    one_point = (("method", (("a", ("loss/progress=a",)),)),)
    study = SweepStudy.create(spec_of("ddp", seeds=(0,), grid=one_point, launcher=slurm), tmp_path)
    from launchers.sweeps.local import record_jobs

    record_jobs(study.sweep_dir, "slurm", "s", [SimpleNamespace(job_id="9_0")], ["w"])
    claim = study.claim("w")
    write_run(claim.run_dir, 0.3, claim.seed)
    with_resources(claim.run_dir, "cuda", 1800.0, CPU_TORCH)
    study.finish(claim, TrialState.COMPLETE, 0.3)
    row = load_runs("ddp", tmp_path).iloc[0]
    assert row["gpus"] == 8.0  # 2 GPUs per task x 4 tasks on the worker's node
    assert row["gpu_hours"] == pytest.approx(4.0)  # 8 GPUs x 0.5 h


def test_learning_curve_bands_follow_the_small_n_rule():
    curves = np.array([[1.0, 0.8, 0.7], [1.2, 0.9, 0.6]])  # (runs, epochs)
    low, high = mean_ci(curves)
    ref = stats.t.interval(0.95, 1, loc=curves.mean(axis=0), scale=stats.sem(curves, axis=0))
    np.testing.assert_allclose(low, ref[0])
    np.testing.assert_allclose(high, ref[1])
    many = np.vstack([curves] * 3)
    np.testing.assert_array_equal(np.stack(mean_ci(many)), np.stack(bootstrap_ci(many)))


def test_iqm_and_probability_of_improvement_equal_rliables_own_output():
    """Reference numbers from rliable 1.2.0 itself (metrics.aggregate_iqm, probability_of_improvement,
    library.get_interval_estimates with percentile CIs; 20000 / 5000 resamples, RandomState(0)) on these
    (runs, tasks) matrices. Point estimates agree exactly; CIs up to Monte-Carlo error."""
    rng = np.random.default_rng(7)
    x, y = rng.normal(0.5, 0.2, size=(5, 3)), rng.normal(0.4, 0.2, size=(6, 3))
    assert statistic(x.ravel(), "iqm") == pytest.approx(0.46877314802428455, abs=1e-15)
    assert probability_of_improvement(list(x.T), list(y.T)) == pytest.approx(0.8222222222222223, abs=1e-15)
    low, high = stratified_bootstrap_ci(list(x.T), "iqm", n_resamples=20_000)
    assert (low, high) == pytest.approx((0.39705989695433574, 0.5269210842608393), abs=0.005)
    assert improvement_ci(list(x.T), list(y.T)) == pytest.approx(
        (0.6555555555555556, 0.9555555555555556), abs=0.02
    )
