"""Sweeps run the code they were submitted with: real local workers import the sweep's snapshot, so an
edit of the checkout after `ablate sweep` changes nothing - for the remaining trials, a killed and
retried trial and a resumed sweep - until `ablate resume --code current` makes the edit the sweep's code."""

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from launchers.snapshot import CODE_ATTR, TRIAL_CODE_ATTR, freeze_sweep, take_snapshot
from launchers.sweeps import slurm
from launchers.sweeps.spec import load_sweep
from sweepstate.study import SweepStudy
from tests.test_provenance import ablate, clone_checkout, edit_lr, metric_rows
from tests.test_slurm import cluster  # noqa: F401 (the fixture)

SWEEP = """
experiment: progress_none
overrides: [debug=fast, trainer.epochs=3, logger.enabled=false, trainer.num_threads=1]
objective: {metric: val/alignment_loss, direction: minimize}
seeds: [0, 1, 2]
grid:
  trainer.weight_decay: [0.0]
workers: 1
lease: {heartbeat_s: 1, timeout_s: 3, max_retries: 2}
launcher: {name: local}
"""
SLURM_SWEEP = """
experiment: progress_none
overrides: [debug=fast, trainer.epochs=1, logger.enabled=false, trainer.num_threads=1]
objective: {metric: val/alignment_loss, direction: minimize}
seeds: [0]
grid:
  trainer.weight_decay: [0.0]
workers: 1
lease: {heartbeat_s: 1, timeout_s: 30, max_retries: 1}
launcher: {name: slurm, slurm: {time: "00:10:00", cpus_per_task: 1, mem: 2G}}
"""


def trials(checkout: Path, root: Path) -> list[dict]:
    out = ablate(checkout, "status", "tiny", "--json", "--root", str(root))
    assert out.returncode == 0, out.stderr
    return [r for r in map(json.loads, out.stdout.splitlines()) if r.get("kind") == "trial"]


def wait_for(condition, what: str, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if result := condition():
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def kill_workers(sweep_dir: Path) -> None:
    """SIGKILL every local worker of the sweep and its processes, as a crashed node would."""
    pids = {int(j["job_id"]) for j in json.loads((sweep_dir / "jobs.json").read_text())}
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after "pid (name)": state, ppid
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    todo = list(pids)
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        pids.add(pid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def epochs_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_sweep_runs_its_snapshot_until_resumed_with_current_code(tmp_path):
    checkout = clone_checkout(tmp_path)
    root, path = tmp_path / "runs", tmp_path / "tiny.yaml"
    path.write_text(SWEEP)
    created = ablate(checkout, "sweep", str(path), "--root", str(root))
    assert created.returncode == 0, created.stderr
    sweep_dir = root / "sweeps" / "tiny"
    old = json.loads((sweep_dir / "code.json").read_text())["current"]
    assert (sweep_dir / "code" / old / "core" / "train" / "loop.py").is_file()
    assert (sweep_dir / "code" / old / "sweep.yaml").read_text() == SWEEP
    edit_lr(checkout)  # the worker is still starting: it must not see this
    study = SweepStudy.open(sweep_dir)

    # the last trial's worker is killed after its first epoch; the resumed sweep retries it (same
    # snapshot) and is killed after its second; `--code current` finishes it with the edit
    def last_trial_at(epochs: int) -> Path | None:
        rows = study.trials()
        running = [t for t in rows if t.state == "RUNNING"]
        done = sum(t.state == "COMPLETE" for t in rows)
        if done == 2 and running and epochs_logged(running[0].run_dir) >= epochs:
            return running[0].run_dir
        return None

    def lease_expired() -> bool:  # the killed worker's trial is recovered by the next resume
        return all(t.heartbeat_age > 3.5 for t in study.trials() if t.state == "RUNNING")

    last = wait_for(lambda: last_trial_at(1), "the last trial's first epoch", timeout=300)
    kill_workers(sweep_dir)
    wait_for(lease_expired, "the lease of the killed worker")
    assert ablate(checkout, "resume", "tiny", "--root", str(root)).returncode == 0
    wait_for(lambda: last_trial_at(2), "the retried trial's second epoch")
    kill_workers(sweep_dir)
    wait_for(lease_expired, "the lease of the killed worker")
    resumed = ablate(checkout, "resume", "tiny", "--code", "current", "--root", str(root), "--wait")
    assert resumed.returncode == 0, resumed.stderr
    assert "uncommitted changes" in resumed.stderr  # a dirty checkout is said, and its diff kept
    index = json.loads((sweep_dir / "code.json").read_text())
    new = index["current"]
    assert new != old and set(index["snapshots"]) == {old, new} and index["snapshots"][new]["git_dirty"]
    assert study.storage.get_study_user_attrs(study.study_id)[CODE_ATTR] == new
    ran = {
        t.user_attrs["trial_key"]: t.user_attrs.get(TRIAL_CODE_ATTR)
        for t in study.storage.get_all_trials(study.study_id)
    }
    assert ran[last.name] == new and {ran[k] for k in ran if k != last.name} == {old}

    rows = trials(checkout, root)
    done = [r for r in rows if r["state"] == "COMPLETE"]
    assert len(done) == 3, rows
    for r in done:
        run_dir = sweep_dir / "trials" / r["key"]
        provenance = json.loads((run_dir / "provenance.json").read_text())
        lrs = [row["lr"] for row in metric_rows(run_dir)]
        if run_dir == last:
            assert r["attempt"] == 3 and r["code"] == provenance["code_hash"] == new
            assert 7.0 not in lrs[:2] and lrs[2] == 7.0  # epochs of the snapshot, then of the edit
            assert [e["code_hash"] for e in provenance["earlier_code"]] == [old]  # it says it mixed
        else:
            assert r["attempt"] == 1 and r["code"] == provenance["code_hash"] == old
            assert "earlier_code" not in provenance
            assert 7.0 not in lrs  # ran after the edit, with the snapshot's code
        assert provenance["snapshot"] == str((sweep_dir / "code" / provenance["code_hash"]).resolve())

    table = ablate(checkout, "table", "tiny", "--format", "csv", "--root", str(root))
    assert table.returncode == 0 and old in table.stdout and new in table.stdout, table.stderr
    pooled = ablate(checkout, "table", "tiny", "--format", "csv", "--root", str(root), "--pool-code")
    assert pooled.returncode == 0 and old not in pooled.stdout and new not in pooled.stdout, pooled.stderr

    # a trial reruns from its snapshot, whatever the checkout holds now
    key = next(r["key"] for r in done if sweep_dir / "trials" / r["key"] != last)
    again = ablate(checkout, "rerun", f"tiny:{key}", "--root", str(root))
    assert again.returncode == 0, again.stderr
    assert "ran other code" not in again.stderr
    mixed = ablate(checkout, "rerun", f"tiny:{last.name}", "--root", str(root))
    assert mixed.returncode == 0, mixed.stderr
    assert f"first epochs ran other code ({old}) before it resumed with {new}" in mixed.stderr
    assert metric_rows(Path(again.stdout.splitlines()[-1])) == metric_rows(sweep_dir / "trials" / key)


def test_snapshot_of_an_unchanged_tree_is_taken_once(tmp_path):
    first = take_snapshot(tmp_path / "code")
    again = take_snapshot(tmp_path / "code")
    assert first.created and not again.created and again.path == first.path
    assert (first.path / "sweepstate" / "study.py").is_file() and not list(first.path.rglob("__pycache__"))


def test_require_clean_refuses_a_dirty_checkout_and_writes_nothing(tmp_path):
    checkout = clone_checkout(tmp_path)
    edit_lr(checkout)
    path, root = tmp_path / "tiny.yaml", tmp_path / "runs"
    path.write_text(SWEEP)
    refused = ablate(checkout, "sweep", str(path), "--root", str(root), "--require-clean")
    assert refused.returncode == 2 and "core/train/loop.py" in refused.stderr
    assert not root.exists()


@pytest.mark.usefixtures("cluster")
def test_slurm_worker_imports_the_sweep_snapshot(tmp_path):
    """A SLURM job starts in the snapshot (submitit `setup` lines), so its trial runs the frozen code."""
    path = tmp_path / "one.yaml"
    path.write_text(SLURM_SWEEP)
    study = SweepStudy.create(load_sweep(path), tmp_path / "runs")
    snap = freeze_sweep(study.sweep_dir, path)
    (job,) = slurm.submit_slurm_workers(study.sweep_dir, 1, slurm.slurm_resources(study.spec.launcher))
    job.wait()
    (trial,) = study.trials()
    assert trial.state == "COMPLETE", job.stderr()
    provenance = json.loads((trial.run_dir / "provenance.json").read_text())
    assert provenance["snapshot"] == str(snap.path) and provenance["code_hash"] == snap.hash
    assert provenance["cwd"] == str(snap.path)
