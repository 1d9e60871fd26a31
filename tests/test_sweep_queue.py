"""The sweep queue on each storage it supports - journal file, SQLite, PostgreSQL - with real processes
and no training (the work is a sleep): every trial runs exactly once under contention, a kill -9'd
worker's trial is recovered and retried within max_retries, pruning sees other processes' results,
concurrent creates enqueue the budget once, and transient storage errors are ridden out.

PostgreSQL is the server tests/postgres/start_postgres.sh starts (its URL from $ABLATE_TEST_POSTGRES_URL
or the file it writes); each test gets a database of its own. Without a server these tests skip on a
workstation, and fail in CI (CI=true), where .ci/run starts one."""

import multiprocessing as mp
import os
import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy
from optuna.trial import TrialState

from sweepstate import storage as storage_module
from sweepstate.spec import GRID_PRUNER, GRID_SAMPLER, ParamSpec, SweepSpec
from sweepstate.storage import StorageUnavailable, mask_secrets, retrying
from sweepstate.study import SweepStudy

PG_URL_FILE = Path(os.environ.get("ABLATE_PG_DIR", "/var/tmp/ablate-postgres")) / "url"


def postgres_url() -> str | None:
    url = os.environ.get("ABLATE_TEST_POSTGRES_URL")
    if not url and PG_URL_FILE.exists():
        url = PG_URL_FILE.read_text().strip()
    return url or None


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The test server's URL; skips without one, except in CI where it must be running."""
    url = postgres_url()
    why = "no PostgreSQL URL (run tests/postgres/start_postgres.sh)"
    if url:
        try:
            engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
            with engine.connect():
                pass
            return url
        except sqlalchemy.exc.SQLAlchemyError as exc:
            why = f"PostgreSQL at {mask_secrets(url)} unreachable: {exc}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the PostgreSQL tests: {why}")
    pytest.skip(why)


@pytest.fixture
def postgres_db(postgres_server: str):
    """A fresh database on the test server for one test (dropped afterwards)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(
        postgres_server, poolclass=sqlalchemy.pool.NullPool, isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    yield postgres_server.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(params=["journal", "sqlite", "postgres"])
def storage(request) -> str | None:
    """The `storage` value of a sweep file for each backend."""
    if request.param == "postgres":
        return request.getfixturevalue("postgres_db")
    return None if request.param == "journal" else "sqlite"


def spec_of(name: str, storage: str | None, **fields) -> SweepSpec:
    """A sweep spec built directly (nothing here composes a config or trains)."""
    base = {
        "name": name,
        "path": f"{name}.yaml",
        "experiment": "progress_learnable",
        "overrides": (),
        "metric": "val/loss",
        "direction": "minimize",
        "seeds": (0, 1),
        "mode": "grid",
        "n_trials": None,
        "params": (),
        "sampler": GRID_SAMPLER,
        "pruner": GRID_PRUNER,
        "grid": (("x", tuple((str(i), (f"x={i}",)) for i in range(5))),),
        "storage": storage,
        "workers": 4,
        "heartbeat_s": 0.5,
        "timeout_s": 30.0,
        "max_retries": 1,
        "launcher": {"name": "local"},
    }
    return SweepSpec(**{**base, **fields})


def _drain(sweep_dir: str, name: str, work_s: float, results) -> None:
    """A worker without training: claim, heartbeat, report, finish until nothing is waiting."""
    done = []
    try:
        study = SweepStudy.open(Path(sweep_dir))
        while (claim := study.claim(name)) is not None:
            study.heartbeat(claim)
            time.sleep(work_s)
            study.report(claim, float(claim.number), 0)
            if study.finish(claim, TrialState.COMPLETE, float(claim.number)):
                done.append(claim.number)
        results.put((name, done, None))
    except Exception as exc:
        results.put((name, done, repr(exc)))


def run_workers(study: SweepStudy, n: int, work_s: float = 0.0) -> dict[str, list[int]]:
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_drain, args=(str(study.sweep_dir), f"w{i}", work_s, results)) for i in range(n)
    ]
    for p in procs:
        p.start()
    out = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert [err for _, _, err in out if err] == []
    return {name: done for name, done, _ in out}


def test_workers_run_every_trial_exactly_once(tmp_path, storage):
    spec = spec_of("once", storage, grid=(("x", tuple((str(i), (f"x={i}",)) for i in range(30))),))
    study = SweepStudy.create(spec, tmp_path)
    assert study.remaining_work() == (60, 0)
    done = run_workers(study, 4)
    numbers = [n for d in done.values() for n in d]
    assert sorted(numbers) == list(range(60))  # none lost, none twice
    assert sum(1 for d in done.values() if d) >= 2  # the work was shared
    trials = study.trials()
    assert Counter(t.state for t in trials) == {"COMPLETE": 60}
    assert all(t.value == t.number and t.last_value == t.number for t in trials)
    assert {(t.params["x"], t.seed) for t in trials} == {(str(i), s) for i in range(30) for s in (0, 1)}
    assert study.remaining_work() == (0, 0)


def _claim_and_hang(sweep_dir: str, ready) -> None:
    study = SweepStudy.open(Path(sweep_dir))
    claim = study.claim("victim", slurm_job="77_1")
    study.heartbeat(claim)
    ready.put(claim.number)
    time.sleep(600)


def test_kill_9_worker_trial_is_recovered_and_retried_within_max_retries(tmp_path, storage):
    spec = spec_of(
        "kill", storage, seeds=(0,), grid=(("x", (("a", ("x=1",)), ("b", ("x=2",)))),), timeout_s=1.0
    )
    study = SweepStudy.create(spec, tmp_path)
    ctx = mp.get_context("fork")
    ready = ctx.Queue()
    victim = ctx.Process(target=_claim_and_hang, args=(str(study.sweep_dir), ready))
    victim.start()
    number = ready.get(timeout=60)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    (running,) = [t for t in study.trials() if t.state == "RUNNING"]
    assert (running.number, running.worker, running.slurm_job) == (number, "victim", "77_1")
    assert study.recover_stale() == []  # its lease is still fresh
    time.sleep(1.2)
    survivor = SweepStudy.open(study.sweep_dir)
    assert survivor.recover_stale() == [number]
    assert survivor.recover_stale() == []  # failed once, retried once
    lost = study.trials()[number]
    assert (
        lost.state == "FAIL"
        and lost.reason.startswith("worker lost: no heartbeat for")
        and "victim" in lost.reason
    )
    a, b = survivor.claim("s"), survivor.claim("s")
    assert survivor.claim("s") is None
    retry, other = (a, b) if a.attempt == 2 else (b, a)
    assert retry.attempt == 2 and retry.key == lost.key and retry.params == lost.params and retry.seed == 0
    assert other.attempt == 1 and survivor.finish(other, TrialState.COMPLETE, 1.0)
    # the retry is lost too: attempt 2 = max_retries + 1 stays failed, nothing more is enqueued
    time.sleep(1.2)
    assert survivor.recover_stale() == [retry.number]
    assert survivor.remaining_work() == (0, 0)
    assert not survivor.finish(retry, TrialState.COMPLETE, 2.0)  # the lost worker's late result is refused
    assert Counter(t.state for t in survivor.trials()) == {"COMPLETE": 1, "FAIL": 2}


def test_pruning_sees_other_processes_results(tmp_path, storage):
    spec = spec_of(
        "prune",
        storage,
        mode="search",
        n_trials=4,
        grid=(),
        seeds=(0,),
        params=(ParamSpec("trainer.lr", "float", low=1e-4, high=1e-2, log=True),),
        sampler={"name": "random", "options": {}},
        pruner={"name": "median", "options": {"n_startup_trials": 2, "n_warmup_steps": 0}},
    )
    study = SweepStudy.create(spec, tmp_path)
    done = run_workers(study, 2)  # two processes, each value = the trial number
    assert sorted(n for d in done.values() for n in d) == [0, 1, 2, 3]
    late = SweepStudy.open(study.sweep_dir)
    assert late.remaining_work() == (0, 0)
    # two more trials by hand: at step 0 the others reported 0..3 (median 1.5): 10 is pruned, 0.5 is not
    for slot in (4, 5):
        late._study.enqueue_trial({}, user_attrs={"slot": slot, "attempt": 1, "seed": 0})
    worse, better = late.claim("w"), late.claim("w")
    assert late.report(worse, 10.0, 0) is True and late.report(better, 0.5, 0) is False
    assert late.finish(worse, TrialState.PRUNED) and late.finish(better, TrialState.COMPLETE, 0.5)
    pruned = late.trials()[worse.number]
    assert pruned.state == "PRUNED" and pruned.value == pruned.last_value == 10.0


def _create(spec: SweepSpec, root: str, results) -> None:
    try:
        SweepStudy.create(spec, Path(root))
        results.put(None)
    except Exception as exc:
        results.put(repr(exc))


def test_concurrent_creates_enqueue_the_budget_once(tmp_path, storage):
    spec = spec_of("create", storage)
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_create, args=(spec, str(tmp_path), results)) for _ in range(4)]
    for p in procs:
        p.start()
    assert [results.get(timeout=120) for _ in procs] == [None] * 4
    for p in procs:
        p.join()
    trials = SweepStudy.open(tmp_path / "sweeps" / "create").trials()
    assert len(trials) == spec.budget == 10
    assert sorted(t.number for t in trials) == list(range(10))
    assert len({t.key for t in trials}) == 10 and {t.state for t in trials} == {"WAITING"}


def test_transient_errors_are_retried_then_reported(monkeypatch, caplog):
    calls = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))
        return "ok"

    assert retrying(flaky, "probe", patience_s=10) == "ok" and len(calls) == 3
    assert "transient storage error" in caplog.text and "connection refused" in caplog.text

    def down() -> None:
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("too many clients"))

    t0 = time.monotonic()
    with pytest.raises(
        StorageUnavailable, match=r"probe: the sweep storage failed \d+ time\(s\).*too many clients"
    ):
        retrying(down, "probe", patience_s=0.5)
    assert time.monotonic() - t0 < 2

    def bug() -> None:
        raise ValueError("not a storage error")

    with pytest.raises(ValueError):
        retrying(bug, "probe", patience_s=10)  # not retried


def test_a_worker_rides_out_a_storage_outage(tmp_path, storage, monkeypatch):
    """Every queue operation's first attempts fail (as when the server restarts): the work still
    completes, exactly once."""
    spec = spec_of("flaky", storage, seeds=(0,))
    study = SweepStudy.create(spec, tmp_path)
    real = storage_module.retrying
    failures = Counter()

    def failing_first(operation, what, patience_s):
        def once_failing():
            if failures[what] % 2 == 0:
                failures[what] += 1
                raise sqlalchemy.exc.OperationalError("x", {}, Exception("server closed the connection"))
            failures[what] += 1
            return operation()

        return real(once_failing, what, patience_s)

    monkeypatch.setattr("sweepstate.study.retrying", failing_first)
    done = []
    while (claim := study.claim("w")) is not None:
        study.heartbeat(claim)
        assert study.finish(claim, TrialState.COMPLETE, 1.0)
        done.append(claim.number)
    assert sorted(done) == list(range(5)) and failures
    assert Counter(t.state for t in study.trials()) == {"COMPLETE": 5}
