"""`ablate sync`: finds the offline wandb runs of a sweep, a run dir or a folder, lists them (--dry-run)
and refuses clearly without W&B credentials. Nothing here talks to a W&B server."""

from pathlib import Path

import pytest

from launchers.cli import main
from launchers.config import compose_experiment
from launchers.sync import offline_runs, wandb_logged_in
from launchers.tracking import WandbReporter, wandb_run_id

KEY = "0123456789abcdef0123456789abcdef01234567"  # the shape of a W&B API key; never sent anywhere


def log_offline(run_dir: Path) -> None:
    """One epoch logged offline into `run_dir`, as a sweep worker logs a trial."""
    cfg = compose_experiment("progress_none", ["debug=fast"])
    reporter = WandbReporter(cfg, run_dir, group="tiny", job_type="progress", tags=[])
    reporter.report(0, {"val/ogpe_action": 0.3})
    reporter.finish({"status": "completed"})


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A results root with a sweep of two trials, one of them resumed once (two offline folders, one
    run id), and a single run outside the sweep."""
    root = tmp_path_factory.mktemp("sync") / "runs"
    sweep = root / "sweeps" / "tiny"
    sweep.mkdir(parents=True)
    (sweep / "sweep.json").write_text("{}")
    for run_dir in (
        sweep / "trials" / "a",
        sweep / "trials" / "a",
        sweep / "trials" / "b",
        root / "single" / "r",
    ):
        log_offline(run_dir)
    return root


@pytest.fixture
def logged_out(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def test_offline_runs_of_a_sweep_run_dir_and_root(root):
    sweep = root / "sweeps" / "tiny"
    runs = offline_runs(sweep)
    assert len(runs) == 3 and not any(r.synced for r in runs)
    resumed = [r for r in runs if r.path.is_relative_to(sweep / "trials" / "a")]
    assert [r.run_id for r in resumed] == [wandb_run_id(sweep / "trials" / "a")] * 2  # one run, resumed
    assert all(r.path.parent.name == "wandb" and r.path.name.startswith("offline-run-") for r in runs)
    assert len(offline_runs(sweep / "trials" / "b")) == 1 and len(offline_runs(root)) == 4


def test_dry_run_lists_what_would_be_synced(root, logged_out, capsys):
    assert main(["sync", "tiny", "--dry-run", "--root", str(root)]) == 0
    out = capsys.readouterr()
    assert "3 offline wandb run(s) under" in out.out and "3 to sync, 0 synced" in out.out
    assert out.out.count("to sync  ") == 3 and "dry run: nothing uploaded" in out.err
    run_dir = root / "single" / "r"
    assert main(["sync", str(run_dir), "--dry-run"]) == 0
    assert f"  to sync  {wandb_run_id(run_dir)}  {run_dir / 'wandb'}" in capsys.readouterr().out
    assert main(["sync", "--dry-run", "--root", str(root)]) == 0  # everything under the results root
    assert "4 to sync" in capsys.readouterr().out


def test_synced_runs_are_listed_as_such_and_not_uploaded_again(tmp_path, logged_out, capsys):
    log_offline(tmp_path / "r")
    (run,) = offline_runs(tmp_path)
    for f in run.path.glob("run-*.wandb"):  # the marker wandb sync leaves behind
        f.with_suffix(".wandb.synced").touch()
    assert main(["sync", str(tmp_path), "--dry-run"]) == 0
    assert "0 to sync, 1 synced" in capsys.readouterr().out
    assert main(["sync", str(tmp_path)]) == 0  # nothing to upload: no login needed, no wandb call


def test_sync_without_credentials_exits_2_and_says_how_to_log_in(root, logged_out, capsys):
    assert not wandb_logged_in()
    assert main(["sync", "tiny", "--root", str(root)]) == 2
    assert "not logged in to W&B: run `wandb login`" in capsys.readouterr().err


def test_credentials_are_found_without_asking_the_server(tmp_path, logged_out, monkeypatch):
    (tmp_path / "netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {KEY}\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_logged_in()
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    assert wandb_logged_in()


def test_unknown_target_exits_2(tmp_path, capsys):
    assert main(["sync", "nope", "--root", str(tmp_path)]) == 2
    assert "nope: neither a folder nor a sweep" in capsys.readouterr().err


def test_run_id_comes_from_the_run_file_not_the_folder_name(root, tmp_path):
    """wandb names a second start within the same second `offline-run-<time>-<id>-1`."""
    import shutil

    (first, *_) = offline_runs(root / "sweeps" / "tiny" / "trials" / "b")
    copy = tmp_path / "wandb" / f"{first.path.name}-1"
    shutil.copytree(first.path, copy)
    assert [r.run_id for r in offline_runs(tmp_path)] == [first.run_id]
