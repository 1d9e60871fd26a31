"""Stop signals: the handler only records the request; `ablate run` and sweep workers checkpoint, give
the run back and resume it to exactly the uninterrupted result. (SLURM itself: test_slurm_recovery.py.)"""

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from core.train.run import run_experiment
from core.train.signals import STOP_SIGNALS, request_stop, stop_on_signals, stop_requested
from launchers import cli
from launchers.config import compose_experiment
from launchers.sweeps.local import submit_local_workers
from launchers.sweeps.spec import load_sweep
from launchers.sweeps.worker import job_after_stop
from sweepstate.study import SweepStudy

REPO = Path(__file__).resolve().parents[1]
RUN = ["debug=fast", "trainer.epochs=4", "logger.enabled=false"]


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not seen after {timeout} s"
        time.sleep(0.05)


def test_a_signal_only_records_a_stop_request_and_handlers_come_back():
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    with stop_on_signals():
        assert stop_requested() is None
        os.kill(os.getpid(), signal.SIGTERM)  # the default action would end pytest
        assert stop_requested() == "SIGTERM"
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop_requested() == "SIGTERM", "the first reason is kept"
    assert stop_requested() is None
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before


def test_outside_the_main_thread_nothing_is_installed_but_requests_still_work():
    seen = {}

    def body():
        with stop_on_signals():
            seen["handler"] = signal.getsignal(signal.SIGUSR2)
            request_stop("manual")
            seen["reason"] = stop_requested()

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == {"handler": signal.getsignal(signal.SIGUSR2), "reason": "manual"}
    assert stop_requested() is None


def test_sigterm_stops_ablate_run_with_a_checkpoint_and_rerunning_it_ends_as_the_uninterrupted_run(tmp_path):
    run_dir = tmp_path / "cut"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "launchers.cli", "run", "progress_learnable", *RUN, "--run-dir", str(run_dir)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.read_text().strip(), 120, "the first epoch")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == cli.EXIT_INTERRUPTED, err
    assert "stopped by SIGTERM" in err, err
    assert (run_dir / "checkpoints" / "last.pt").exists()
    assert len(_rows(run_dir)) < 4
    (hint,) = [line for line in err.splitlines() if line.startswith("resume it with: ")]
    again = shlex.split(hint.removeprefix("resume it with: "))
    assert again[:2] == ["ablate", "run"]

    full = run_experiment(compose_experiment("progress_learnable", RUN), tmp_path / "full")
    assert cli.main(again[1:]) == cli.EXIT_OK
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_epoch"] >= 1
    assert _rows(run_dir) == _rows(tmp_path / "full")
    assert summary["eval"] == full["eval"]


def test_only_submitit_jobs_are_requeued_after_a_stop(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert job_after_stop("SIGUSR2") == "end"  # `python -m launchers.sweeps.worker`: nothing to requeue
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    assert job_after_stop("SIGUSR2") == "requeue"  # submitit's preemption / time-limit signal
    assert job_after_stop("SIGTERM") == "end"  # a local SIGTERM is a kill, not a time limit


@pytest.mark.slow  # two worker starts and a reference run: ~30-50 s
def test_preempted_local_worker_requeues_itself_and_resumes_its_trial_exactly(tmp_path):
    """submitit's local executor restarts a job that exits with its requeue code: the path of
    `scontrol requeue` under SLURM, without a cluster. (`job._interrupt()` would signal the local
    controller, which does not forward USR2: the worker process is signalled as SLURM does.)"""
    sweep = {
        "experiment": "progress_learnable",
        "overrides": ["debug=fast", "trainer.epochs=4", "logger.enabled=false", "trainer.num_threads=1"],
        "objective": {"metric": "val/ogpe_action", "direction": "minimize"},
        "seeds": [0],
        "grid": {"trainer.lr": [0.001]},
        "workers": 1,
    }
    path = tmp_path / "preempt.yaml"
    path.write_text(yaml.safe_dump(sweep))
    study = SweepStudy.create(load_sweep(path), tmp_path / "runs")
    (job,) = submit_local_workers(study.sweep_dir, 1)

    def first_epoch_done() -> bool:
        running = [t for t in study.trials() if t.state == "RUNNING"]
        return bool(running) and (running[0].run_dir / "metrics.jsonl").exists()

    _wait_for(first_epoch_done, 120, "the trial's first epoch")
    task = f"submitit.core._submit {study.sweep_dir / 'workers'}"
    (pid,) = subprocess.run(["pgrep", "-f", task], capture_output=True, text=True, check=True).stdout.split()
    os.kill(int(pid), signal.SIGUSR2)  # as SLURM sends it before a time limit
    # the reference trains while the worker stops, restarts and resumes
    cfg = compose_experiment(study.spec.experiment, study.spec.trial_overrides({"trainer.lr": "0.001"}, 0))
    run_experiment(cfg, tmp_path / "reference")
    assert job.result() == 1  # the restarted worker resumed the trial and left
    interrupted, retry = study.trials()
    assert interrupted.state == "FAIL" and interrupted.reason.startswith("interrupted: stopped by SIGUSR2")
    assert retry.state == "COMPLETE" and retry.attempt == 2 and retry.key == interrupted.key
    summary = json.loads((retry.run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_epoch"] >= 1
    assert _rows(retry.run_dir) == _rows(tmp_path / "reference")
    log = next((study.sweep_dir / "workers").glob("*_log.err")).read_text()
    assert "requeueing job" in log, log


@pytest.fixture(autouse=True)
def _no_stop_left_over():
    yield
    assert stop_requested() is None


def _started_with_sigint_ignored(code: str) -> subprocess.Popen:
    """A Python process started as a background job of a non-interactive shell starts it: SIGINT
    ignored. It prints "ready" once `code` ran."""
    proc = subprocess.Popen(
        [sys.executable, "-c", f"{code}\nprint('ready', flush=True)\nimport time\ntime.sleep(60)"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_ctrl_c_interrupts_a_process_that_inherited_sigint_ignored():
    deaf = _started_with_sigint_ignored("pass")
    hearing = _started_with_sigint_ignored(
        "from core.train.signals import ctrl_c_interrupts\nctrl_c_interrupts()"
    )
    try:
        for proc in (deaf, hearing):
            proc.send_signal(signal.SIGINT)
        # an uncaught KeyboardInterrupt ends Python as SIGINT's default action would
        assert hearing.wait(timeout=30) == -signal.SIGINT and "KeyboardInterrupt" in hearing.stderr.read()
        time.sleep(0.5)
        assert deaf.poll() is None  # the premise: without it, Ctrl-C does nothing
    finally:
        for proc in (deaf, hearing):
            proc.kill()
            proc.wait()
