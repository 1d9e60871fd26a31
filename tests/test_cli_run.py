"""`ablate run` and `ablate eval` end to end: the run directory of DESIGN.md, wandb offline files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launchers.cli import main


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ABLATE_ROOT", str(root))
        assert (
            main(
                [
                    "run",
                    "progress_learnable_ab",
                    "debug=fast",
                    "loss.progress.lambda=0.7",
                    "loss.progress.k=4",
                ]
            )
            == 0
        )
    (run_dir,) = (root / "progress_learnable_ab").iterdir()
    return run_dir


def test_run_writes_the_run_directory(finished_run):
    for name in ("config.yaml", "splits.json", "metrics.jsonl", "summary.json"):
        assert (finished_run / name).is_file(), name
    for name in ("best_model_combined.pt", "best_model_alignment.pt", "last.pt"):
        assert (finished_run / "checkpoints" / name).is_file(), name
    for name in ("dual_loss_comparison.png", "progress_combined.png"):
        assert (finished_run / "plots" / name).stat().st_size > 10_000, name
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_run"] == 2
    assert summary["environment"]["packages"]["torch"].startswith("2.")
    assert "git_commit" in summary["environment"]
    assert summary["splits"]["video_progress_gt"] == "release"  # the ground truth `ogpe` was scored against
    for key in (
        "test/ogpe",
        "test/ogpe_action",
        "test/ogpe_action_baseline_const",
        "test/ogpe_action_baseline_ramp",
    ):
        assert 0.0 <= summary["eval"][key] <= 1.5, key
    splits = json.loads((finished_run / "splits.json").read_text())
    assert set(splits) == {"t0", "t1"} and all(set(s) == {"train", "val", "test"} for s in splits.values())


def test_total_is_alignment_plus_lambda_times_progress(finished_run):
    rows = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        for split in ("train", "val"):
            expected = r[f"{split}/alignment_loss"] + 0.7 * r[f"{split}/progress_loss"]
            assert r[f"{split}/total_loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
            assert r[f"{split}/progress_loss"] > 0
        assert r["val/ogpe"] >= 0 and r["val/ogpe_action"] >= 0


def test_wandb_offline_run_is_written_in_the_run_dir(finished_run):
    offline = list((finished_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0


def test_eval_writes_metrics_for_the_chosen_checkpoint(finished_run, capsys):
    assert main(["eval", str(finished_run), "--checkpoint", "alignment"]) == 0
    metrics = json.loads((finished_run / "eval" / "alignment.json").read_text())
    assert json.loads(capsys.readouterr().out) == metrics
    assert {"test/ogpe", "val/ogpe", "test/ogpe_action"} <= set(metrics)
    assert (finished_run / "plots" / "progress_alignment.png").is_file()


def test_eval_of_a_non_run_exits_2(tmp_path):
    assert main(["eval", str(tmp_path)]) == 2


def test_console_script_is_installed_and_exits_2_on_bad_input(tmp_path):
    ablate = Path(sys.executable).parent / "ablate"
    out = subprocess.run([str(ablate), "run", "nope"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "unknown experiment 'nope'" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_analysis_reads_the_run_back(finished_run):
    from analysis.records import load_history, load_runs

    runs = load_runs(finished_run.parent)
    assert len(runs) == 1
    row = runs.iloc[0]
    assert row["status"] == "completed" and row["cfg.loss.progress.lambda"] == 0.7
    summary = json.loads((finished_run / "summary.json").read_text())
    assert row["test/ogpe"] == summary["eval"]["test/ogpe"]
    history = load_history(finished_run.parent)
    val = history[history.metric == "val/total_loss"].sort_values("epoch")["value"].tolist()
    rows = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert val == [r["val/total_loss"] for r in rows]


def test_logged_metrics_names_exactly_what_the_run_logged(finished_run):
    from core.train.families import logged_metrics
    from launchers.config import compose_experiment

    cfg = compose_experiment("progress_learnable_ab", ["debug=fast"])
    rows = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((finished_run / "summary.json").read_text())
    logged = set(rows[-1]) | {k for k in summary["eval"] if "/" in k}
    assert logged == logged_metrics(cfg)
