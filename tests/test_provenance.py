"""Provenance and exact reruns: a run from a dirty checkout records its diff, and `ablate rerun`
rebuilds that code (commit + diff) and reproduces its metrics.jsonl exactly on CPU."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from core.provenance import package_mismatch
from launchers.snapshot import snapshot_env

REPO = Path(__file__).resolve().parents[1]
RUN = ["progress_none", "debug=fast", "trainer.epochs=1", "logger.enabled=false", "seed=3"]
# an edit that changes a logged metric: the learning rate column reads 7.0
LR_LINE = 'metrics["lr"] = self.optimizer.param_groups[0]["lr"]'
EDITED_LR_LINE = 'metrics["lr"] = 7.0'


def clone_checkout(tmp_path: Path) -> Path:
    """A throwaway git clone of this project's committed code, to dirty freely."""
    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("the project is not a git checkout")
    clone = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    return clone


def edit_lr(checkout: Path) -> None:
    loop = checkout / "core" / "train" / "loop.py"
    text = loop.read_text()
    assert LR_LINE in text
    loop.write_text(text.replace(LR_LINE, EDITED_LR_LINE))


def ablate(checkout: Path, *args: str) -> subprocess.CompletedProcess:
    """The `ablate` CLI of the code in `checkout` (not of this process's code). Its output goes through
    files, not pipes: the workers it starts outlive it and hold on to them."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        done = subprocess.run(
            [sys.executable, "-m", "launchers.cli", *args],
            cwd=checkout,
            env=snapshot_env(checkout, {**os.environ, "WANDB_MODE": "offline"}),
            stdout=out,
            stderr=err,
            text=True,
        )
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(done.args, done.returncode, out.read(), err.read())


def metric_rows(run_dir: Path) -> list[dict]:
    """The logged metrics per epoch, timings left out."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in rows]


def test_rerun_of_a_dirty_run_applies_its_diff_and_reproduces_its_metrics(tmp_path):
    checkout = clone_checkout(tmp_path)
    edit_lr(checkout)
    (checkout / "core" / "new_module.py").write_text("X = 1\n")  # untracked: part of the diff too
    root = tmp_path / "runs"
    done = ablate(checkout, "run", *RUN, "--root", str(root))
    assert done.returncode == 0, done.stderr
    original = Path(done.stdout.splitlines()[-1])

    record = json.loads((original / "provenance.json").read_text())
    assert record["git_dirty"] is True and record["overrides"] == RUN[1:]
    assert record["experiment"] == "progress_none" and record["command"][2:-2] == ["run", *RUN]
    assert record["packages"]["torch"].startswith("2.") and record["python"] and record["host"]
    patch = (original / "diff.patch").read_text()
    assert EDITED_LR_LINE in patch and "core/new_module.py" in patch
    assert [r["lr"] for r in metric_rows(original)] == [7.0]

    # the checkout is clean again: only the saved diff can bring the edit back
    subprocess.run(["git", "-C", str(checkout), "checkout", "-q", "--", "."], check=True)
    (checkout / "core" / "new_module.py").unlink()
    again = ablate(checkout, "rerun", str(original), "--root", str(root))
    assert again.returncode == 0, again.stderr
    rerun = Path(again.stdout.splitlines()[-1])
    assert rerun != original and rerun.parent == original.parent
    assert metric_rows(rerun) == metric_rows(original)
    assert json.loads((rerun / "provenance.json").read_text())["code_hash"] == record["code_hash"]


def test_package_mismatch_names_each_changed_distribution():
    recorded = {"torch": "2.4.0", "numpy": "1.26.4", "gone": "1.0"}
    installed = {"torch": "2.5.1", "numpy": "1.26.4", "new": "0.1"}
    assert package_mismatch(recorded, installed) == [
        "gone: recorded 1.0, installed not installed",
        "new: recorded not installed, installed 0.1",
        "torch: recorded 2.4.0, installed 2.5.1",
    ]
