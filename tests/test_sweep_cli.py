"""`ablate sweep / status / resume` end to end with real local workers (submitit) and a real journal."""

import json
import time
from pathlib import Path

import pytest

from launchers.cli import main

SWEEP = """
experiment: progress_learnable
overrides: [debug=fast, trainer.epochs=1, logger.enabled=false, trainer.num_threads=1]
objective: {metric: val/ogpe_action, direction: minimize}
seeds: [0, 1]
grid:
  loss/progress: [cumulative_l2, learnable]
workers: 2
lease: {heartbeat_s: 1, timeout_s: 20, max_retries: 1}
"""


def _status(name, capsys):
    capsys.readouterr()
    assert main(["status", name, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_sweep_then_resume_twice_runs_every_point_once(tmp_path, results_root, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(SWEEP)
    assert main(["sweep", str(path)]) == 0  # returns at once; workers go on in the background
    assert main(["resume", "tiny"]) == 0  # submits more workers for what is still waiting
    deadline = time.time() + 240
    while time.time() < deadline:
        rows = _status("tiny", capsys)
        if rows and all(r["state"] in ("COMPLETE", "FAIL", "PRUNED") for r in rows):
            break
        time.sleep(2)
    assert len(rows) == 4 and all(r["state"] == "COMPLETE" for r in rows), rows
    assert len({r["key"] for r in rows}) == 4
    for r in rows:
        summary = json.loads(
            (results_root / "sweeps" / "tiny" / "trials" / r["key"] / "summary.json").read_text()
        )
        assert summary["status"] == "completed" and summary["resumed_from_epoch"] is None
        assert r["job_id"] is not None
    capsys.readouterr()
    assert main(["resume", "tiny", "--wait"]) == 0  # nothing left: no new worker, no new trial
    out = capsys.readouterr()
    assert "nothing to submit" in out.err and "complete 4" in out.out
    assert len(_status("tiny", capsys)) == 4
    logs = list((results_root / "sweeps" / "tiny" / "workers").glob("*_log.out"))
    assert logs, "per-worker log files"
    capsys.readouterr()
    assert main(["table", "tiny", "--format", "csv"]) == 0
    csv = capsys.readouterr().out
    assert "cumulative_l2" in csv and "learnable" in csv
    assert main(["plot", "tiny"]) == 0
    plots = capsys.readouterr().out.split()
    assert plots and all(Path(p).is_file() for p in plots)
    assert main(["table", "tiny", "--by", "no_such_axis"]) == 2


def test_status_of_an_unknown_sweep_exits_2(results_root, capsys):
    assert main(["status", "nope"]) == 2
    assert "no sweep 'nope'" in capsys.readouterr().err


def test_bad_sweep_file_exits_2_and_creates_nothing(tmp_path, results_root, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(SWEEP.replace("val/ogpe_action", "val/ogpe_actoin"))
    assert main(["sweep", str(path)]) == 2
    assert "val/ogpe_actoin" in capsys.readouterr().err
    assert not results_root.exists()
