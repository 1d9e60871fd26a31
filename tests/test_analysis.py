"""Sweep result tables and plots on fabricated runs with known numbers: statistics against values
computed here independently (numpy loops, scipy), a real Optuna sweep study driven through the study
API with summaries written in core/train/run.py's layout (no training), and the three renderings."""

import io
import json
import math
import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState
from scipy import stats

from analysis.commands import plot_command, table_command
from analysis.records import load_history, load_runs
from analysis.stats import aggregate, bootstrap_ci, find_group, holm, paired_tests
from analysis.tables import ablation_table, format_mean_ci, render_markdown
from sweepstate.spec import GRID_PRUNER, GRID_SAMPLER, ParamSpec, SweepSpec
from sweepstate.study import SweepStudy

METRIC = "val/ogpe_action"
COLUMN = f"final/{METRIC}"
SEEDS = tuple(range(8))
BASE = np.array([0.50, 0.52, 0.48, 0.51, 0.49, 0.53, 0.47, 0.505])
# a: clearly better than none on every seed; b: within noise of a (mixed signs); c: one complete seed
VALUES = {
    "none": BASE,
    "a": BASE - np.array([0.10, 0.09, 0.11, 0.1, 0.12, 0.08, 0.095, 0.105]),
    "b": BASE
    - np.array([0.10, 0.09, 0.11, 0.1, 0.12, 0.08, 0.095, 0.105])
    + np.array([0.01, -0.005, 0.02, -0.01, 0.005, 0.015, -0.002, 0.01]),
    "c": BASE - 0.05,
}
RUNNING, FAILED, WAITING = {("a", 4)}, {("c", s) for s in range(1, 7)}, {("c", 7)}
EPOCHS = 3


def spec_of(name: str, **fields) -> SweepSpec:
    """A tiny sweep spec built directly (no config composition: nothing here trains)."""
    base = {
        "name": name,
        "path": f"{name}.yaml",
        "experiment": "progress_learnable",
        "overrides": ("debug=fast",),
        "metric": METRIC,
        "direction": "minimize",
        "seeds": SEEDS,
        "mode": "grid",
        "n_trials": None,
        "params": (),
        "sampler": GRID_SAMPLER,
        "pruner": GRID_PRUNER,
        "grid": (("method", tuple((m, (f"loss/progress={m}",)) for m in VALUES)),),
        "storage": None,
        "workers": 1,
        "heartbeat_s": 1.0,
        "timeout_s": 30.0,
        "max_retries": 1,
        "launcher": {"name": "local"},
    }
    return SweepSpec(**{**base, **fields})


def write_run(run_dir: Path, value: float, seed: int, status: str = "completed") -> None:
    """summary.json, config.yaml and metrics.jsonl as core/train/run.py writes them; the objective
    falls linearly to `value` at the last epoch, the test metric is value + 0.01."""
    run_dir.mkdir(parents=True, exist_ok=True)
    history = [
        {"epoch": e, METRIC: value + 0.1 * (EPOCHS - 1 - e), "train/total_loss": 1.0 / (e + 1)}
        for e in range(EPOCHS)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in history))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "loss": {"progress": {"k": 8}}}))
    summary = {"experiment": "progress_learnable", "family": "progress", "run_dir": str(run_dir)}
    if status == "running":
        summary["status"] = "running"
    elif status == "failed":
        summary.update(status="failed", reason="RuntimeError: boom", wall_time_s=1.5)
    else:
        summary.update(
            status=status,
            epochs_run=EPOCHS,
            final=history[-1],
            best={"combined": {"value": value - 0.001, "epoch": EPOCHS - 1}},
            eval={"checkpoint": "combined", METRIC: value - 0.001, "test/ogpe_action": value + 0.01},
            wall_time_s=12.5,
        )
    (run_dir / "summary.json").write_text(json.dumps(summary))


def build_grid_sweep(root: Path, name: str = "abl") -> SweepStudy:
    """The grid sweep of VALUES: every trial claimed in queue order and finished through the study API
    except RUNNING (claimed, never finished) and WAITING (never claimed)."""
    study = SweepStudy.create(spec_of(name), root)
    n_claims = study.spec.budget - len(WAITING)
    for _ in range(n_claims):
        claim = study.claim("w0")
        point = (claim.params["method"], claim.seed)
        value = float(VALUES[point[0]][point[1]])
        if point in RUNNING:
            write_run(claim.run_dir, value, claim.seed, "running")
        elif point in FAILED:
            write_run(claim.run_dir, value, claim.seed, "failed")
            study.finish(claim, TrialState.FAIL, reason="RuntimeError: boom")
        else:
            write_run(claim.run_dir, value, claim.seed)
            study.finish(claim, TrialState.COMPLETE, value)
    return study


def complete_values(method: str) -> np.ndarray:
    return np.array([VALUES[method][s] for s in SEEDS if (method, s) not in RUNNING | FAILED | WAITING])


def shared(m1: str, m2: str) -> tuple[np.ndarray, np.ndarray]:
    done = lambda m, s: (m, s) not in RUNNING | FAILED | WAITING  # noqa: E731
    seeds = [s for s in SEEDS if done(m1, s) and done(m2, s)]
    return VALUES[m1][seeds], VALUES[m2][seeds]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    return root, build_grid_sweep(root)


@pytest.fixture(scope="module")
def grid_runs(grid):
    return load_runs("abl", grid[0])


# -------------------------------------------------------------------------------------------- stats
def test_holm_on_a_hand_example():
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02], rtol=0, atol=1e-15)
    np.testing.assert_allclose(holm([np.nan, 0.2, 0.6]), [np.nan, 0.4, 0.6], atol=1e-15)
    np.testing.assert_allclose(holm([0.6, 0.7]), [1.0, 1.0])
    assert holm([]).shape == (0,)


def test_bootstrap_ci_equals_a_loop_over_resamples_and_agrees_with_scipy():
    x = np.array([0.31, 0.35, 0.29, 0.40, 0.33, 0.37])
    rng = np.random.default_rng(0)
    means = [x[rng.integers(0, len(x), size=len(x))].mean() for _ in range(10_000)]
    low, high = bootstrap_ci(x)
    assert low == pytest.approx(np.percentile(means, 2.5), abs=1e-9)
    assert high == pytest.approx(np.percentile(means, 97.5), abs=1e-9)
    ref = stats.bootstrap((x,), np.mean, method="percentile", n_resamples=10_000, random_state=1)
    assert low == pytest.approx(ref.confidence_interval.low, abs=3e-3)
    assert high == pytest.approx(ref.confidence_interval.high, abs=3e-3)
    assert all(math.isnan(v) for v in bootstrap_ci(x[:1]))


def test_aggregate_equals_numpy_per_group(grid_runs):
    done = grid_runs[grid_runs["state"] == "complete"]
    agg = aggregate(done, ["method"], COLUMN).set_index("method")
    assert list(agg.index) == ["none", "a", "b", "c"]
    for method in VALUES:
        x = complete_values(method)
        row = agg.loc[method]
        assert row["n"] == len(x)
        assert row["mean"] == pytest.approx(x.mean(), abs=1e-9)
        if len(x) < 2:
            assert math.isnan(row["std"]) and math.isnan(row["ci_low"])
            continue
        assert row["std"] == pytest.approx(x.std(ddof=1), abs=1e-9)
        assert row["sem"] == pytest.approx(stats.sem(x), abs=1e-9)
        rng = np.random.default_rng(0)
        means = [x[rng.integers(0, len(x), size=len(x))].mean() for _ in range(10_000)]
        assert row["ci_low"] == pytest.approx(np.percentile(means, 2.5), abs=1e-9)
        assert row["ci_high"] == pytest.approx(np.percentile(means, 97.5), abs=1e-9)


@pytest.mark.parametrize("test", ["wilcoxon", "ttest"])
def test_paired_tests_equal_scipy_with_holm(grid_runs, test):
    done = grid_runs[grid_runs["state"] == "complete"]
    out = paired_tests(done, ["method"], COLUMN, "none", test=test).set_index("method")
    scipy_test = stats.wilcoxon if test == "wilcoxon" else stats.ttest_rel
    p = {m: scipy_test(*shared(m, "none")).pvalue for m in ("a", "b")}
    lo, hi = sorted(p, key=p.get)
    expected_holm = {lo: min(2 * p[lo], 1), hi: min(max(2 * p[lo], p[hi]), 1)}
    for m in ("a", "b"):
        assert out.loc[m, "n_pairs"] == len(shared(m, "none")[0])
        assert out.loc[m, "p"] == pytest.approx(p[m], abs=1e-9)
        assert out.loc[m, "p_holm"] == pytest.approx(expected_holm[m], abs=1e-9)
        assert out.loc[m, "delta"] == pytest.approx(np.mean(np.subtract(*shared(m, "none"))), abs=1e-12)
    assert math.isnan(out.loc["none", "p"]) and math.isnan(out.loc["c", "p"])  # baseline; 1 shared seed
    # vs the best (a): none and b compared (m = 2), c has one shared seed
    p_best = {m: scipy_test(*shared(m, "a")).pvalue for m in ("none", "b")}
    adjusted = holm([p_best["none"], p_best["b"]])
    assert out.loc["none", "p_vs_best_holm"] == pytest.approx(adjusted[0], abs=1e-9)
    assert out.loc["b", "p_vs_best_holm"] == pytest.approx(adjusted[1], abs=1e-9)
    assert out["best"].tolist() == [False, True, False, False]
    if test == "wilcoxon":
        assert out["vs_best"].to_dict() == {"none": "worse", "a": "best", "b": "tied", "c": "undetermined"}


def test_paired_tests_over_two_axes_and_a_marginal_axis():
    rng = np.random.default_rng(5)
    cells = {
        (x, y): rng.normal(size=6) + i
        for i, (x, y) in enumerate([("p", "u"), ("p", "v"), ("q", "u"), ("q", "v")])
    }
    df = pd.DataFrame(
        [{"x": x, "y": y, "seed": s, "m": v[s]} for (x, y), v in cells.items() for s in range(6)]
    )
    out = paired_tests(df, ["x", "y"], "m", "x=q, y=u", test="ttest")
    assert out["baseline"].tolist() == [False, False, True, False]
    for i, cell in enumerate(cells):
        if cell != ("q", "u"):
            assert out.loc[i, "p"] == pytest.approx(
                stats.ttest_rel(cells[cell], cells[("q", "u")]).pvalue, abs=1e-12
            )
    # grouped by x alone, a seed's value is the mean over y (the marginal over the other axis)
    marginal = paired_tests(df, ["x"], "m", "p", test="ttest").set_index("x")
    q, p = (cells[("q", "u")] + cells[("q", "v")]) / 2, (cells[("p", "u")] + cells[("p", "v")]) / 2
    assert marginal.loc["q", "p"] == pytest.approx(stats.ttest_rel(q, p).pvalue, abs=1e-12)
    assert marginal.loc["q", "delta"] == pytest.approx(np.mean(q - p), abs=1e-12)


def test_paired_tests_maximize_picks_the_largest_mean(grid_runs):
    done = grid_runs[grid_runs["state"] == "complete"]
    out = paired_tests(done, ["method"], COLUMN, direction="maximize").set_index("method")
    assert out["vs_best"]["none"] == "best" and out["p"].isna().all()


def test_find_group_by_value_or_axis_and_rejects_ambiguity():
    keys = [("gtcc", "none"), ("gtcc", "lav"), ("tcc", "none")]
    by = ["loss/alignment", "method"]
    assert find_group(keys, by, "tcc") == ("tcc", "none")
    assert find_group(keys, by, "loss/alignment=gtcc, method=lav") == ("gtcc", "lav")
    with pytest.raises(ValueError, match="2 groups match"):
        find_group(keys, by, "none")
    with pytest.raises(ValueError, match="no group match"):
        find_group(keys, by, "vava")


# ------------------------------------------------------------------------------------------ records
def test_load_runs_of_a_sweep_has_one_row_per_trial_with_state_params_and_metrics(grid, grid_runs):
    runs = grid_runs
    assert len(runs) == 32
    assert runs["state"].value_counts().to_dict() == {"complete": 24, "failed": 6, "running": 1, "waiting": 1}
    a4 = runs[(runs["method"] == "a") & (runs["seed"] == 4)].iloc[0]
    assert a4["state"] == "running" and math.isnan(a4[COLUMN]) and a4["status"] == "running"
    waiting = runs[runs["state"] == "waiting"].iloc[0]
    assert (waiting["method"], waiting["seed"]) == ("c", 7)  # the point of a never-claimed trial
    assert math.isnan(waiting[COLUMN]) and isinstance(waiting["key"], str)
    failed = runs[runs["state"] == "failed"]
    assert (failed["reason"] == "RuntimeError: boom").all()
    b2 = runs[(runs["method"] == "b") & (runs["seed"] == 2)].iloc[0]
    assert b2[COLUMN] == VALUES["b"][2] and b2["value"] == VALUES["b"][2]
    assert b2["test/ogpe_action"] == pytest.approx(VALUES["b"][2] + 0.01)
    assert b2["best/combined"] == pytest.approx(VALUES["b"][2] - 0.001) and b2["best_epoch/combined"] == 2
    assert b2["epochs_run"] == EPOCHS and b2["wall_time_s"] == 12.5 and b2["cfg.loss.progress.k"] == 8
    assert Path(b2["run_dir"]).parent == grid[1].sweep_dir / "trials"


def test_load_history_is_long_and_joins_back_on_run_dir(grid_runs):
    history = load_history(runs=grid_runs)
    b2 = grid_runs[(grid_runs["method"] == "b") & (grid_runs["seed"] == 2)].iloc[0]
    curve = history[(history["run_dir"] == b2["run_dir"]) & (history["metric"] == METRIC)]
    assert curve.sort_values("epoch")["value"].tolist() == pytest.approx(
        [VALUES["b"][2] + 0.2, VALUES["b"][2] + 0.1, VALUES["b"][2]]
    )
    assert set(history.columns) == {"run_dir", "epoch", "metric", "value"}


def test_a_retried_trial_keeps_only_its_latest_attempt(tmp_path):
    one_point = (("method", (("a", ("loss/progress=a",)),)),)
    study = SweepStudy.create(spec_of("retry", seeds=(0,), grid=one_point), tmp_path)
    claim = study.claim("w0")
    write_run(claim.run_dir, 0.3, 0, "running")
    assert study.recover_stale(now=time.time() + 3600) == [claim.number]  # worker lost -> attempt 2
    runs = load_runs(study.sweep_dir)
    row = runs[runs["key"] == claim.key]
    assert len(row) == 1 and row.iloc[0]["attempt"] == 2 and row.iloc[0]["state"] == "waiting"
    retry = study.claim("w1")
    assert retry.key == claim.key and retry.attempt == 2
    write_run(retry.run_dir, 0.25, 0)
    study.finish(retry, TrialState.COMPLETE, 0.25)
    row = load_runs("retry", tmp_path).set_index("key").loc[claim.key]
    assert row["state"] == "complete" and row[COLUMN] == 0.25


def test_load_runs_of_plain_run_dirs(tmp_path):
    write_run(tmp_path / "exp" / "r1", 0.4, seed=3)
    write_run(tmp_path / "exp" / "r2", 0.5, seed=4, status="failed")
    runs = load_runs(tmp_path / "exp").set_index("seed")
    assert runs.loc[3, "state"] == "complete" and runs.loc[3, COLUMN] == 0.4
    assert runs.loc[4, "state"] == "failed" and runs.loc[4, "reason"] == "RuntimeError: boom"
    assert math.isnan(runs.loc[4, COLUMN])
    with pytest.raises(ValueError, match="neither a run directory nor a sweep"):
        load_runs(tmp_path / "missing", tmp_path)


def test_load_runs_below_a_results_root_names_sweep_trials(grid):
    runs = load_runs(grid[0])  # a plain path: every run dir below it (31 with a summary)
    assert len(runs) == 31 and (runs["sweep"] == "abl").all() and runs["key"].str.len().eq(12).all()


def with_resources(run_dir: Path, device: str, wall_s: float | None, environment: dict) -> None:
    """A write_run dir that trained on `device` for `wall_s` seconds, `environment` as summary.json's."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**cfg, "trainer": {"device": device}}))
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.update(wall_time_s=wall_s, environment={"git_commit": "abc", **environment})
    (run_dir / "summary.json").write_text(json.dumps(summary))


CPU_TORCH, CUDA_TORCH = {"packages": {"torch": "2.13.0+cpu"}}, {"packages": {"torch": "2.13.0"}}


@pytest.mark.parametrize(
    ("device", "wall_s", "environment", "gpus", "gpu_hours"),
    [
        ("cpu", 7200.0, CUDA_TORCH, 0, 0.0),
        ("cuda:0", 5400.0, CUDA_TORCH, 1, 1.5),
        ("cuda", 1800.0, {"gpus": 4, **CUDA_TORCH}, 4, 2.0),  # what the process recorded wins
        ("auto", 3600.0, CPU_TORCH, 0, 0.0),  # a CPU-only torch build cannot have used a GPU
        ("auto", 3600.0, CUDA_TORCH, math.nan, math.nan),  # unknown: not guessed
        ("cuda", None, CUDA_TORCH, 1, math.nan),  # still running: no wall time yet
    ],
)
def test_gpu_hours_of_a_single_run_are_its_gpus_times_its_wall_time(
    tmp_path, device, wall_s, environment, gpus, gpu_hours
):
    write_run(tmp_path / "r", 0.4, 0)
    with_resources(tmp_path / "r", device, wall_s, environment)
    row = load_runs(tmp_path).iloc[0]
    assert row["gpus"] == pytest.approx(gpus, nan_ok=True)
    assert row["gpu_hours"] == pytest.approx(gpu_hours, nan_ok=True)


def test_gpu_hours_of_sweep_trials_count_the_slurm_allocation_of_their_worker(tmp_path):
    from launchers.sweeps.local import record_jobs

    slurm = {"name": "slurm", "slurm": {"gpus_per_task": 2, "time": "01:00:00"}}
    one_point = (("method", (("a", ("loss/progress=a",)),)),)
    study = SweepStudy.create(spec_of("gpus", seeds=(0, 1, 2), grid=one_point, launcher=slurm), tmp_path)
    record_jobs(study.sweep_dir, "slurm", "s", [SimpleNamespace(job_id="77_0")], ["slurm-w"])
    record_jobs(study.sweep_dir, "local", "s", [SimpleNamespace(job_id="4242")], ["local-w"])
    # worker -> wall time: a SLURM worker (billed its 2 GPUs though it ran on CPU), a local one, and
    # one jobs.json does not know (taken to have run on the sweep's own launcher)
    walls = {"slurm-w": 5400.0, "local-w": 3600.0, "unrecorded-w": 900.0}
    for worker, wall in walls.items():
        claim = study.claim(worker)
        write_run(claim.run_dir, 0.3, claim.seed)
        with_resources(claim.run_dir, "cpu", wall, CPU_TORCH)
        study.finish(claim, TrialState.COMPLETE, 0.3)
    runs = load_runs("gpus", tmp_path)
    assert runs["gpus"].tolist() == [2.0, 0.0, 2.0]
    assert runs["gpu_hours"].tolist() == pytest.approx([3.0, 0.0, 0.5])
    # below a plain path the worker is unknown: every trial is taken to have run on the sweep's launcher
    assert load_runs(study.sweep_dir / "trials")["gpu_hours"].sum() == pytest.approx(3.0 + 2.0 + 0.5)


# ------------------------------------------------------------------------------------------- tables
def test_table_counts_unfinished_trials_and_marks_best_and_ties(grid_runs):
    table = ablation_table(grid_runs, ["method"], COLUMN).set_index("method")
    counts = table[["n_complete", "n_failed", "n_running", "n_waiting", "n"]]
    assert counts.loc["a"].tolist() == [7, 0, 1, 0, 7]
    assert counts.loc["c"].tolist() == [1, 6, 0, 1, 1]
    assert table["vs_best"].to_dict() == {"none": "worse", "a": "best", "b": "tied", "c": "undetermined"}


def test_table_command_markdown(grid):
    out = table_command("abl", grid[0], None, None, "markdown", None, "wilcoxon")
    assert out.startswith("sweep abl (grid, final/val/ogpe_action, minimize): 32 trials: complete 24")
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in out.splitlines()[2:8]}
    header = rows.pop("method")
    assert header[:2] == ["final/val/ogpe_action (mean ± 95% CI)", "std"]
    assert header[2:] == ["n_complete", "n_failed", "n_running", "n_waiting"]
    for method in VALUES:
        x = complete_values(method)
        lo, hi = bootstrap_ci(x)
        assert format_mean_ci(x.mean(), lo, hi) in rows[method][0]
    assert rows["a"][0].startswith("**") and rows["a"][0].endswith("**")
    assert rows["b"][0].endswith(" †") and rows["c"][0] == f"{VALUES['c'][0]:.4f} ?"
    assert rows["c"][2:] == ["1", "6", "0", "1"] and rows["a"][2:] == ["7", "0", "1", "0"]
    assert "†: not significantly different from the best (paired wilcoxon" in out


def test_format_mean_ci_covers_an_asymmetric_ci():
    assert format_mean_ci(0.4123, 0.40, 0.43) == "0.412 ± 0.018"
    assert format_mean_ci(12.0, 11.0, 12.5) == "12.0 ± 1.0"
    assert format_mean_ci(float("nan"), 0, 1) == "-"


def test_table_command_with_baseline_and_csv_and_latex(grid):
    md = table_command("abl", grid[0], ["method"], "test/ogpe_action", "markdown", "none", "ttest")
    assert "delta vs none" in md and "p (ttest, Holm)" in md
    none_row = next(line for line in md.splitlines() if line.startswith("| none"))
    assert [c.strip() for c in none_row.split("|")[-4:-1]] == ["(baseline)", "-", "-"]  # delta, p, P(better)
    csv = pd.read_csv(io.StringIO(table_command("abl", grid[0], None, None, "csv", "none", "wilcoxon")))
    assert csv["method"].tolist() == list(VALUES)
    np.testing.assert_allclose(csv["mean"], [complete_values(m).mean() for m in VALUES], atol=1e-12)
    assert csv["n_failed"].tolist() == [0, 0, 0, 6] and csv["vs_best"].tolist()[1] == "best"
    p_b = stats.wilcoxon(*shared("b", "none")).pvalue
    assert csv.set_index("method").loc["b", "p"] == pytest.approx(p_b, abs=1e-9)
    tex = table_command("abl", grid[0], None, None, "latex", None, "wilcoxon")
    for token in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}{lrrrrrr}"):
        assert token in tex
    assert r"final/val/ogpe\_action (mean $\pm$ 95\% CI)" in tex and r"n\_complete" in tex
    assert re.search(r"\\textbf\{0\.\d+ \$\\pm\$ 0\.\d+\}", tex)
    assert r"$^\dagger$" in tex and "$^?$" in tex and tex.startswith("% sweep abl")


def test_table_command_rejects_bad_input(grid):
    root = grid[0]
    with pytest.raises(ValueError, match="no sweep here"):
        table_command("nope", root, None, None, "markdown", None, "wilcoxon")
    with pytest.raises(ValueError, match=r"unknown axis 'lr'.*grid axes: method"):
        table_command("abl", root, ["lr"], None, "markdown", None, "wilcoxon")
    with pytest.raises(ValueError, match=r"unknown metric 'val/nope'.*final/val/ogpe_action"):
        table_command("abl", root, None, "val/nope", "markdown", None, "wilcoxon")
    with pytest.raises(ValueError, match="unknown format"):
        table_command("abl", root, None, None, "html", None, "wilcoxon")
    with pytest.raises(ValueError, match="unknown test"):
        table_command("abl", root, None, None, "markdown", None, "sign")
    with pytest.raises(ValueError, match="baseline 'zzz': no group match"):
        table_command("abl", root, None, None, "markdown", "zzz", "wilcoxon")


def test_a_sweep_with_nothing_finished_gives_an_empty_table(tmp_path):
    study = SweepStudy.create(spec_of("fresh", seeds=(0, 1)), tmp_path)
    study.claim("w0")
    out = table_command("fresh", tmp_path, None, None, "markdown", None, "wilcoxon")
    assert "running 1, waiting 7" in out and "| none   |" in out
    assert plot_command("fresh", tmp_path) == []


# ------------------------------------------------------------------------------------ search sweeps
SEARCH_PARAMS = (
    ParamSpec("loss.progress.lambda", "float", 1e-3, 10.0, log=True),
    ParamSpec("loss.progress.fixes.learnable_h0", "categorical", choices=(False, True)),
)


def build_search_sweep(root: Path, n_complete: int) -> tuple[SweepStudy, dict[int, float]]:
    spec = spec_of(
        "srch",
        mode="search",
        n_trials=6,
        grid=(),
        params=SEARCH_PARAMS,
        seeds=(0, 1, 2),
        sampler={"name": "random", "options": {}},
        pruner={"name": "none", "options": {}},
    )
    study = SweepStudy.create(spec, root)
    values = {}
    for _ in range(n_complete):
        claim = study.claim("w0")
        lam, h0 = claim.params["loss.progress.lambda"], claim.params["loss.progress.fixes.learnable_h0"]
        values[claim.number] = value = abs(math.log10(lam)) * 0.1 + (0.05 if h0 else 0.0)
        write_run(claim.run_dir, value, claim.seed)
        study.finish(claim, TrialState.COMPLETE, value)
    return study, values


def test_search_table_lists_top_trials_importances_and_a_rerun_sweep(tmp_path):
    study, values = build_search_sweep(tmp_path, n_complete=6)
    out = table_command("srch", tmp_path, None, None, "markdown", None, "wilcoxon")
    assert "top 5 of 6 complete trials by final/val/ogpe_action" in out
    ranked = sorted(values, key=values.get)[:5]
    top_rows = [line for line in out.splitlines() if re.match(r"\| \d+ ", line)]
    assert [int(r.split("|")[1]) for r in top_rows] == ranked
    assert (
        "parameter importances (" in out and "loss.progress.lambda" in out.split("parameter importances")[1]
    )
    snippet = yaml.safe_load(out.split("```yaml\n")[1].split("```")[0])
    assert snippet["seeds"] == [3, 4, 5, 6, 7, 8] and snippet["objective"]["metric"] == METRIC
    configs = snippet["grid"]["config"]
    assert list(configs) == [f"trial_{n}" for n in ranked]
    best = next(t for t in study.trials() if t.number == ranked[0])
    assert configs[f"trial_{ranked[0]}"] == [
        f"loss.progress.lambda={best.params['loss.progress.lambda']!r}",
        f"loss.progress.fixes.learnable_h0={str(best.params['loss.progress.fixes.learnable_h0']).lower()}",
    ]
    tex = table_command("srch", tmp_path, None, None, "latex", None, "wilcoxon")
    assert r"\toprule" in tex and "% re-run the top 5" in tex
    assert all(line.startswith(("%", "\\", "")) for line in tex.splitlines())
    paths = plot_command("srch", tmp_path)
    assert [p.name for p in paths] == ["optimisation_history.png", "param_importances.png"]
    assert all(p.stat().st_size > 5_000 for p in paths)


def test_search_table_guards_importances_below_two_complete_trials(tmp_path):
    build_search_sweep(tmp_path, n_complete=1)
    out = table_command("srch", tmp_path, None, None, "markdown", None, "wilcoxon")
    assert "top 1 of 1 complete trials" in out and "need at least 2 complete trials" in out


def test_search_table_shows_the_code_of_each_top_trial_when_it_changed(tmp_path):
    study, _ = build_search_sweep(tmp_path, n_complete=4)
    out = table_command("srch", tmp_path, None, None, "csv", None, "wilcoxon")
    assert "code" not in out.splitlines()[0]  # one code (here: none recorded): no column
    done = [t for t in study.trials() if t.state == "COMPLETE"]
    for i, t in enumerate(done):  # the last two ran after `ablate resume --code current`
        (t.run_dir / "provenance.json").write_text(json.dumps({"code_hash": "aaaa" if i < 2 else "bbbb"}))
    top = pd.read_csv(io.StringIO(table_command("srch", tmp_path, None, None, "csv", None, "wilcoxon")))
    assert list(top.columns)[-1] == "code" and len(top) == 4
    expected = {t.number: ("aaaa" if i < 2 else "bbbb") for i, t in enumerate(done)}
    assert dict(zip(top["trial"], top["code"], strict=True)) == expected


# -------------------------------------------------------------------------------------------- plots
def test_plot_command_writes_sweep_figures(grid):
    root, study = grid
    paths = plot_command("abl", root)
    names = [p.name for p in paths]
    assert names == [
        "ablation_final_val_ogpe_action.png",
        "ablation_test_ogpe_action.png",
        "curves_val_ogpe_action.png",
    ]
    for p in paths:
        assert p.parent == study.sweep_dir / "plots" and p.stat().st_size > 5_000
    assert not list((study.sweep_dir / "plots").glob(".*tmp*"))  # atomic writes leave no temp file


def test_plot_command_lists_a_run_dirs_own_plots(tmp_path):
    run = tmp_path / "run"
    write_run(run, 0.4, 0)
    (run / "metrics.jsonl").unlink()  # nothing to redraw: what exists is listed as it is
    (run / "plots").mkdir()
    for name in ("progress_combined.png", "dual_loss_comparison.png", "extra.png"):
        (run / "plots" / name).write_bytes(b"\x89PNG")
    assert [p.name for p in plot_command(str(run), tmp_path)] == [
        "dual_loss_comparison.png",
        "extra.png",
        "progress_combined.png",
    ]
    assert (run / "plots" / "dual_loss_comparison.png").read_bytes() == b"\x89PNG"
    with pytest.raises(ValueError, match="neither a run directory"):
        plot_command(str(tmp_path), tmp_path)


def test_render_markdown_escapes_pipes(grid_runs):
    runs = grid_runs.assign(method=grid_runs["method"].replace({"none": "no|ne"}))
    md = render_markdown(ablation_table(runs, ["method"], COLUMN))
    assert "no\\|ne" in md


def test_ablate_plot_redraws_a_finished_progress_runs_figures_and_lists_them(tmp_path, capsys):
    from launchers.cli import main

    root = tmp_path / "runs"
    args = [
        "progress_learnable",
        "debug=fast",
        "trainer.epochs=1",
        "logger.enabled=false",
        "--root",
        str(root),
    ]
    assert main(["run", *args]) == 0
    (run,) = (root / "progress_learnable").iterdir()
    evaluated = json.loads((run / "eval" / "combined.json").read_text())
    shutil.rmtree(run / "plots")  # e.g. copied back from a cluster without them
    capsys.readouterr()
    assert main(["plot", str(run)]) == 0
    printed = [Path(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == [
        run / "plots" / name
        for name in ("calibration_combined.png", "dual_loss_comparison.png", "progress_combined.png")
    ]
    assert all(p.stat().st_size > 10_000 for p in printed)
    # the panels came from evaluating the combined checkpoint again: the same numbers
    assert json.loads((run / "eval" / "combined.json").read_text()) == pytest.approx(evaluated, abs=1e-9)
    # with the panels on disk, nothing is evaluated again; the loss curves are redrawn from metrics.jsonl
    stamp = (run / "eval" / "combined.json").stat().st_mtime_ns
    (run / "plots" / "dual_loss_comparison.png").unlink()
    assert plot_command(str(run), root) == printed and printed[1].is_file()
    assert (run / "eval" / "combined.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("test", ["wilcoxon", "ttest"])
def test_axes_left_out_of_by_can_block_the_pairs(test):
    """Grouped by `fixes` alone, runs pair on (seed, head): one pair per cell, not seed means."""
    rng = np.random.default_rng(3)
    rows = [
        {"fixes": f, "head": h, "seed": s, "m": rng.normal(0.1 * (f == "b") + 0.3 * (h == "y"), 0.05)}
        for f in ("a", "b")
        for h in ("x", "y", "z")
        for s in (0, 1, 2)
    ]
    df = pd.DataFrame(rows)
    out = paired_tests(df, ["fixes"], "m", baseline_label="a", test=test, pair_on=["seed", "head"])
    a = [r["m"] for r in rows if r["fixes"] == "a"]  # same (head, seed) order for both groups
    b = [r["m"] for r in rows if r["fixes"] == "b"]
    expected = stats.wilcoxon(b, a) if test == "wilcoxon" else stats.ttest_rel(b, a)
    row = out[out["fixes"] == "b"].iloc[0]
    assert row["n_pairs"] == 9
    assert row["p"] == pytest.approx(expected.pvalue, abs=1e-9)
    assert row["delta"] == pytest.approx(np.mean(np.subtract(b, a)), abs=1e-12)
    # the default pairs seed means: 3 pairs
    assert paired_tests(df, ["fixes"], "m", baseline_label="a", test=test).iloc[1]["n_pairs"] == 3
