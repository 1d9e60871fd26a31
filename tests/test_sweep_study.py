"""The sweep queue end to end, with real processes on a real storage: every trial of the budget runs
exactly once, dead workers' trials are recovered and resumed, pruning works across processes, and a
failing trial is recorded and skipped."""

import json
import math
import multiprocessing as mp
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from launchers.config import compose_experiment
from launchers.sweeps.slurm import trial_job_outcomes
from launchers.sweeps.spec import load_sweep
from launchers.sweeps.status import format_status, status_json_lines
from launchers.sweeps.worker import run_worker, trial_threads
from sweepstate.spec import SweepError, SweepSpec, trial_key
from sweepstate.study import SweepStudy, mask_secrets

REPO = Path(__file__).resolve().parents[1]
# ~0.5 s per epoch on one core: 6 videos per task, split 2/2/2
TINY = [
    "debug=fast",
    "logger.enabled=false",
    "trainer.num_threads=1",
    "data.generator.videos_per_task=6",
    "data.split_fractions=[0.34,0.33,0.33]",
]


def make_spec(tmp_path: Path, name: str, overrides: tuple[str, ...] = (), **body) -> SweepSpec:
    """A validated sweep from a sweep file written under tmp_path (the stem is the sweep name);
    `overrides` are the experiment overrides of every trial."""
    body = {
        "experiment": "progress_learnable",
        "overrides": list(overrides),
        "objective": {"metric": "val/ogpe_action", "direction": "minimize"},
        "seeds": [0],
        **body,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return load_sweep(path)


def start_worker(sweep_dir: Path, name: str) -> subprocess.Popen:
    log = open(sweep_dir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "launchers.sweeps.worker", str(sweep_dir), "--worker", name],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def wait_all(procs: list[subprocess.Popen], sweep_dir: Path, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        logs = "\n".join(p.read_text()[-2000:] for p in sweep_dir.glob("*.log"))
        pytest.fail(f"workers did not finish in {timeout} s:\n{logs}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def by_state(trials) -> Counter:
    return Counter(t.state for t in trials)


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- fast


def test_mask_secrets_hides_only_the_password():
    assert mask_secrets("postgresql://alice:s3cr%40t@db.example.org:5432/sweeps") == (
        "postgresql://alice:***@db.example.org:5432/sweeps"
    )
    assert mask_secrets("postgresql+psycopg2://bob:p:w@host/db") == "postgresql+psycopg2://bob:***@host/db"
    for url in ("postgresql://host/db", "sqlite:////tmp/x.db", "postgresql://carol@host/db"):
        assert mask_secrets(url) == url


def test_create_is_idempotent_and_concurrent_safe(tmp_path):
    spec = make_spec(
        tmp_path,
        "idem",
        overrides=TINY,
        grid={"loss/alignment": ["gtcc", "tcc"], "trainer.lr": [0.001, 0.003]},
        seeds=[0, 1],
    )
    errors = []

    def create():
        try:
            SweepStudy.create(spec, tmp_path / "runs")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    study = SweepStudy.create(spec, tmp_path / "runs")
    trials = study.trials()
    assert len(trials) == spec.budget == 8 and by_state(trials) == {"WAITING": 8}
    expected = {trial_key("idem", point, seed) for point in spec.grid_points() for seed in spec.seeds}
    assert {t.key for t in trials} == expected
    assert json.loads((study.sweep_dir / "sweep.json").read_text()) == spec.to_dict()

    # operational settings may change when a sweep is continued; its trials may not
    more_workers = SweepSpec.from_dict({**spec.to_dict(), "workers": 5, "timeout_s": 120.0})
    assert SweepStudy.create(more_workers, tmp_path / "runs").spec.workers == 5
    assert len(SweepStudy.open("idem", tmp_path / "runs").trials()) == 8
    other_seeds = SweepSpec.from_dict({**spec.to_dict(), "seeds": [0, 1, 2]})
    with pytest.raises(SweepError, match="seeds"):
        SweepStudy.create(other_seeds, tmp_path / "runs")
    other_storage = SweepSpec.from_dict({**spec.to_dict(), "storage": "sqlite"})
    with pytest.raises(SweepError, match="storage"):
        SweepStudy.create(other_storage, tmp_path / "runs")
    with pytest.raises(SweepError, match="no sweep"):
        SweepStudy.open("missing", tmp_path / "runs")
    (study.sweep_dir / "optuna.journal").unlink()
    with pytest.raises(SweepError, match="no study 'idem'"):
        SweepStudy.open(study.sweep_dir)


@pytest.mark.parametrize("storage", [None, "sqlite"])
def test_lost_trial_is_failed_once_and_retried_with_same_key(tmp_path, storage):
    spec = make_spec(
        tmp_path,
        "lease",
        overrides=TINY,
        search={
            "n_trials": 2,
            "params": {"trainer.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
            "sampler": {"name": "tpe"},
        },
        seeds=[3, 4],
        storage=storage,
        lease={"heartbeat_s": 1, "timeout_s": 5, "max_retries": 1},
    )
    study = SweepStudy.create(spec, tmp_path / "runs")
    first = study.claim("ghost")
    assert first.attempt == 1 and first.seed == 3 and first.run_dir == study.sweep_dir / "trials" / first.key
    assert first.overrides[-2:] == [f"trainer.lr={first.params['trainer.lr']!r}", "seed=3"]
    assert study.recover_stale() == []  # its heartbeat is fresh

    later = time.time() + spec.timeout_s + 1
    assert study.recover_stale(now=later) == [first.number]
    assert SweepStudy.open(study.sweep_dir).recover_stale(now=later) == []  # already failed: no 2nd retry
    with pytest.raises(UpdateFinishedTrialError):
        study.heartbeat(first)  # the lost worker's lease is gone ...
    assert not study.finish(first, TrialState.COMPLETE, 0.5)  # ... and its late result is refused
    lost = study.trials()[first.number]
    assert (
        lost.state == "FAIL"
        and lost.reason.startswith("worker lost: no heartbeat for")
        and "ghost" in lost.reason
    )
    assert study.remaining_work() == (2, 0)

    claims = sorted([study.claim("w1"), study.claim("w1")], key=lambda c: c.number)  # the other, the retry
    retry = claims[1]
    assert claims[0].attempt == 1 and retry.attempt == 2 and retry.number == 2
    assert (retry.key, retry.seed, retry.params) == (first.key, first.seed, first.params)
    assert study.claim("w1") is None  # nothing beyond the budget + 1 retry
    # both lost: the retry (attempt 2 = max_retries + 1) stays failed, the other trial is retried
    assert study.recover_stale(now=time.time() + 2 * spec.timeout_s) == [c.number for c in claims]
    assert study.remaining_work() == (1, 0)  # only the other trial's (first) retry
    assert study.claim("w1").attempt == 2 and study.claim("w1") is None


def test_a_lost_trial_names_the_slurm_job_that_claimed_it(tmp_path, monkeypatch):
    spec = make_spec(
        tmp_path,
        "job",
        overrides=TINY,
        grid={"trainer.lr": [0.001, 0.002]},
        lease={"heartbeat_s": 1, "timeout_s": 5, "max_retries": 1},
    )
    study = SweepStudy.create(spec, tmp_path / "runs", job_outcomes=trial_job_outcomes)
    on_slurm = study.claim("w-slurm", slurm_job="4242_1")
    local = study.claim("w-local")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sacct (a laptop reading the sweep): no reason, no error
    assert sorted(study.recover_stale(now=time.time() + 6)) == sorted([on_slurm.number, local.number])
    trials = study.trials()
    lost = trials[on_slurm.number]
    assert lost.slurm_job == "4242_1" and lost.exit_reason is None
    assert re.fullmatch(
        r"worker lost: no heartbeat for \d+ s \(worker w-slurm\): slurm job 4242_1 \(state unknown.*\)",
        lost.reason,
    ), lost.reason
    assert trials[local.number].slurm_job is None
    assert re.fullmatch(
        r"worker lost: no heartbeat for \d+ s \(worker w-local\)", trials[local.number].reason
    )
    assert all(t.slurm_job is None for t in trials[2:])  # the retries, not claimed yet
    rows = [json.loads(line) for line in status_json_lines(study).splitlines()]
    assert [(r["kind"], r["job_id"], r["job_state"]) for r in rows[:2]] == [
        ("trial", "4242_1", None),
        ("trial", None, None),
    ]
    assert "4242_1" in format_status(study)


def test_worker_threads_follow_the_config_else_slurm_cpus_per_task(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    default = compose_experiment("progress_none", [])
    assert default.trainer.num_threads is None and trial_threads(default) == 1  # local workers share cores
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    assert trial_threads(default) == 4  # 4 trials on one node do not each take every core
    assert trial_threads(compose_experiment("progress_none", ["trainer.num_threads=2"])) == 2


def test_nan_objective_is_a_failure(tmp_path):
    spec = make_spec(tmp_path, "nan", overrides=TINY, grid={"trainer.lr": [0.001]})
    study = SweepStudy.create(spec, tmp_path / "runs")
    claim = study.claim("w")
    assert study.finish(claim, TrialState.COMPLETE, math.nan)
    (t,) = study.trials()
    assert t.state == "FAIL" and t.reason == "objective val/ogpe_action is nan"


# ---------------------------------------------------------------------------------------------- processes


def _drain(sweep_dir: str, name: str, barrier, results) -> None:
    """A trivial worker: race to recover the stale trials, then claim/finish until nothing is left."""
    recovered, done, refused = [], [], []
    try:
        study = SweepStudy.open(Path(sweep_dir))
        barrier.wait()
        recovered = study.recover_stale(now=time.time() + study.spec.timeout_s + 1)
        barrier.wait()  # nobody claims before all have looked: a fresh claim must not look stale
        while (claim := study.claim(name)) is not None:
            if not study.finish(claim, TrialState.COMPLETE, claim.params["trainer.lr"]):
                refused.append(claim.number)
            done.append(claim.number)
    except Exception as exc:
        refused.append(repr(exc))
    results.put((recovered, done, refused))


@pytest.mark.slow
@pytest.mark.parametrize(("storage", "n_trials"), [(None, 200), ("sqlite", 60)])
def test_eight_processes_hammering_one_storage_lose_nothing(tmp_path, storage, n_trials):
    n_stale, n_procs = 20, 8
    spec = make_spec(
        tmp_path,
        "hammer",
        overrides=TINY,
        search={
            "n_trials": n_trials,
            "params": {"trainer.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
            "sampler": {"name": "random"},
        },
        storage=storage,
        lease={"heartbeat_s": 10, "timeout_s": 60, "max_retries": 1},
    )
    study = SweepStudy.create(spec, tmp_path / "runs")
    stale = [study.claim("ghost") for _ in range(n_stale)]  # claimed by a worker that then "dies"
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(n_procs), ctx.Queue()
    procs = [
        ctx.Process(target=_drain, args=(str(study.sweep_dir), f"p{i}", barrier, results))
        for i in range(n_procs)
    ]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    out = [results.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    elapsed = time.perf_counter() - t0
    what = f"{n_procs} processes, {n_trials} trials + {n_stale} retries"
    print(f"\n{storage or 'journal'}: {what} in {elapsed:.1f} s")

    # all processes raced to recover the same stale trials: each was failed and re-enqueued once
    assert [r for _, _, r in out] == [[]] * n_procs  # no error, no refused result
    recovered = sorted(n for rec, _, _ in out for n in rec)
    assert recovered == sorted(c.number for c in stale)
    trials = study.trials()
    assert len(trials) == n_trials + n_stale
    assert by_state(trials) == {"COMPLETE": n_trials, "FAIL": n_stale}
    done = [n for _, d, _ in out for n in d]
    assert len(done) == len(set(done)) == n_trials  # no trial claimed twice
    assert sum(1 for _, d, _ in out if d) >= 2  # the work was really shared
    complete = [t for t in trials if t.state == "COMPLETE"]
    assert all(t.value == t.params["trainer.lr"] for t in complete)  # each result on its own trial
    assert len({t.key for t in complete}) == n_trials
    by_number = {t.number: t for t in trials}
    for c in stale:
        (retry,) = [t for t in complete if t.key == c.key]
        assert retry.attempt == 2 and retry.params == by_number[c.number].params
        assert by_number[c.number].reason.startswith("worker lost")


@pytest.mark.slow
def test_search_sweep_prunes_across_workers(tmp_path):
    epochs = 4
    # val/total_loss = alignment + lambda * progress grows with lambda: large lambdas are clearly worse.
    # The sampler's seed is derived from the sweep name and trial number; for this name the lambdas of
    # trials 0..7 are 0.11, 0.99, 9487, 0.07, 0.03, 6.3, 302, 374, so trials 6 and 7 (at least) are
    # pruned whatever the order of completion: two small-lambda trials have completed before they start.
    spec = make_spec(
        tmp_path,
        "prune",
        overrides=(*TINY, f"trainer.epochs={epochs}"),
        objective={"metric": "val/total_loss", "direction": "minimize"},
        search={
            "n_trials": 8,
            "params": {"loss.progress.lambda": {"type": "float", "low": 1e-2, "high": 1e4, "log": True}},
            "sampler": {"name": "random"},
            "pruner": {"name": "median", "options": {"n_startup_trials": 2, "n_warmup_steps": 0}},
        },
        lease={"heartbeat_s": 1, "timeout_s": 30, "max_retries": 0},
    )
    study = SweepStudy.create(spec, tmp_path / "runs")
    t0 = time.perf_counter()
    wait_all([start_worker(study.sweep_dir, f"w{i}") for i in range(2)], study.sweep_dir)
    trials = study.trials()
    states = by_state(trials)
    print(f"\nsearch: {dict(states)} in {time.perf_counter() - t0:.1f} s")
    assert len(trials) == 8 and states["COMPLETE"] + states["PRUNED"] == 8
    pruned = [t for t in trials if t.state == "PRUNED"]
    assert {6, 7} <= {t.number for t in pruned}
    complete = [t for t in trials if t.state == "COMPLETE"]
    curves = {t.number: [r["val/total_loss"] for r in metric_rows(t.run_dir)] for t in complete}
    for t in complete:
        assert len(curves[t.number]) == epochs and t.last_epoch == epochs - 1
        assert t.value == pytest.approx(summary_of(t.run_dir)["final"]["val/total_loss"])
    for t in pruned:
        summary = summary_of(t.run_dir)
        assert summary["status"] == "pruned" and summary["epochs_run"] == t.last_epoch + 1 <= epochs
        assert t.value == t.last_value  # Optuna records the last reported value
        # pruned for being worse than the median of completed trials at that epoch
        assert t.last_value > min(c[t.last_epoch] for c in curves.values())
    assert {t.worker for t in trials} == {"w0", "w1"}


@pytest.mark.slow
def test_grid_with_three_workers_runs_every_point_and_seed_once(tmp_path):
    epochs = 2
    spec = make_spec(
        tmp_path,
        "grid3",
        overrides=(*TINY, f"trainer.epochs={epochs}"),
        grid={"loss/alignment": ["gtcc", "tcc"], "trainer.lr": [0.001, 0.003]},
        seeds=[0, 1],
        lease={"heartbeat_s": 1, "timeout_s": 30, "max_retries": 0},
    )
    study = SweepStudy.create(spec, tmp_path / "runs")
    t0 = time.perf_counter()
    wait_all([start_worker(study.sweep_dir, f"w{i}") for i in range(3)], study.sweep_dir)
    trials = study.trials()
    print(f"\ngrid: {len(trials)} trials by 3 workers in {time.perf_counter() - t0:.1f} s")
    assert len(trials) == spec.budget == 8 and by_state(trials) == {"COMPLETE": 8}
    runs = sorted((json.dumps(t.params, sort_keys=True), t.seed) for t in trials)
    assert runs == sorted((json.dumps(p, sort_keys=True), s) for p in spec.grid_points() for s in spec.seeds)
    assert len({t.key for t in trials}) == 8
    assert sorted(p.name for p in (study.sweep_dir / "trials").iterdir()) == sorted(t.key for t in trials)
    for t in trials:
        summary = summary_of(t.run_dir)
        assert summary["status"] == "completed" and summary["resumed_from_epoch"] is None
        assert len(metric_rows(t.run_dir)) == epochs
        assert yaml.safe_load((t.run_dir / "config.yaml").read_text())["seed"] == t.seed
    assert len({t.worker for t in trials}) >= 2


@pytest.mark.slow
def test_killed_worker_trial_is_recovered_and_resumed(tmp_path):
    epochs = 8
    spec = make_spec(
        tmp_path,
        "kill",
        overrides=(*TINY, f"trainer.epochs={epochs}"),
        grid={"trainer.lr": [0.001, 0.002]},
        lease={"heartbeat_s": 1, "timeout_s": 4, "max_retries": 1},
    )
    study = SweepStudy.create(spec, tmp_path / "runs")
    t0 = time.perf_counter()
    victim = start_worker(study.sweep_dir, "victim")
    procs = [victim]
    try:
        deadline = time.monotonic() + 60
        while not (mine := [t for t in study.trials() if t.worker == "victim" and t.state == "RUNNING"]):
            assert time.monotonic() < deadline and victim.poll() is None
            time.sleep(0.05)
        procs.append(start_worker(study.sweep_dir, "survivor"))
        (dead,) = mine
        while not (dead.run_dir / "checkpoints" / "last.pt").exists():
            assert time.monotonic() < deadline and victim.poll() is None
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        wait_all(procs[1:], study.sweep_dir)
    finally:
        wait_all(procs, study.sweep_dir, timeout=1)
    print(f"\nkill: recovered and completed in {time.perf_counter() - t0:.1f} s")

    trials = study.trials()
    assert by_state(trials) == {"COMPLETE": 2, "FAIL": 1} and len(trials) == 3
    (failed,) = [t for t in trials if t.state == "FAIL"]
    assert failed.number == dead.number and failed.worker == "victim"
    assert failed.reason.startswith("worker lost: no heartbeat for") and "victim" in failed.reason
    complete = [t for t in trials if t.state == "COMPLETE"]
    assert sorted(t.key for t in complete) == sorted({trial_key("kill", p, 0) for p in spec.grid_points()})
    (retry,) = [t for t in complete if t.key == dead.key]
    assert retry.attempt == 2 and retry.worker == "survivor"
    summary = summary_of(retry.run_dir)
    assert summary["status"] == "completed" and summary["resumed_from_epoch"] >= 1
    assert [r["epoch"] for r in metric_rows(retry.run_dir)] == list(range(epochs))
    assert retry.value == pytest.approx(summary["final"]["val/ogpe_action"])


@pytest.mark.slow
def test_terminated_worker_gives_its_trial_back_at_once(tmp_path):
    epochs = 6
    spec = make_spec(
        tmp_path,
        "term",
        overrides=(*TINY, f"trainer.epochs={epochs}"),
        grid={"trainer.lr": [0.001]},
        lease={"heartbeat_s": 1, "timeout_s": 60, "max_retries": 0},
    )
    study = SweepStudy.create(spec, tmp_path / "runs")
    worker = start_worker(study.sweep_dir, "term")
    run_dir = study.sweep_dir / "trials" / trial_key("term", {"trainer.lr": "0.001"}, 0)
    deadline = time.monotonic() + 60
    while not (run_dir / "checkpoints" / "last.pt").exists():
        assert time.monotonic() < deadline and worker.poll() is None
        time.sleep(0.02)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 130
    first, retry = study.trials()
    assert first.state == "FAIL" and first.reason.startswith("interrupted: stopped by SIGTERM")
    assert first.reason.endswith("(worker term)")
    # back in the queue without waiting for the lease timeout, and whatever max_retries says
    assert retry.state == "WAITING" and retry.key == first.key and retry.attempt == 2
    assert run_worker(study.sweep_dir, "solo") == 1
    summary = summary_of(run_dir)
    assert summary["status"] == "completed" and summary["resumed_from_epoch"] >= 1
    assert len(metric_rows(run_dir)) == epochs


@pytest.mark.slow
def test_failing_trials_are_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    spec = make_spec(
        tmp_path,
        "fails",
        overrides=TINY,
        # a threshold no loss is below: every batch is skipped, the run raises TrainingFailed
        grid={"trainer.explode_threshold": [1.0e7, 1.0e-9]},
    )
    # a label whose override does not compose (the file check would reject it: bypass it here)
    data = spec.to_dict()
    data["grid"][0][1].append(["bad", ["trainer.no_such_key=1"]])
    spec = SweepSpec.from_dict(data)
    study = SweepStudy.create(spec, tmp_path / "runs")
    assert run_worker(study.sweep_dir, "solo") == 3
    trials = {t.params["trainer.explode_threshold"]: t for t in study.trials()}
    assert trials["10000000.0"].state == "COMPLETE"
    assert trials["1e-09"].state == "FAIL" and trials["1e-09"].reason.startswith("TrainingFailed: epoch 0")
    assert summary_of(trials["1e-09"].run_dir)["status"] == "failed"
    assert trials["bad"].state == "FAIL" and trials["bad"].reason.startswith("ConfigError:")
    assert "no_such_key" in trials["bad"].reason
    assert all(t.attempt == 1 for t in trials.values())  # failures are not retried
    assert "trial 1 failed: TrainingFailed" in capsys.readouterr().err
