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
from optuna.exceptions import UpdateFinishedTrialError
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


def test_report_and_finish_mean_the_same_on_every_storage(tmp_path, storage):
    """The queue's own writes (SQL on an RDB, the storage API on the journal) keep Optuna's meaning:
    a step reported twice keeps its first value, infinities survive, a finished or lost trial refuses
    reports, heartbeats and a late result."""
    study = SweepStudy.create(spec_of("writes", storage, seeds=(0,)), tmp_path)
    a, b = study.claim("w"), study.claim("w")
    assert study.report(a, 1.0, 0) is False  # a grid's pruner never prunes
    study.report(a, 2.0, 0)
    study.report(a, float("inf"), 1)
    study.report(b, -1.5, 3)
    assert study.finish(a, TrialState.COMPLETE, float("-inf"))  # not finite: recorded as a failure
    assert study.finish(b, TrialState.COMPLETE, 0.25)
    assert study.finish(b, TrialState.COMPLETE, 0.25)  # recorded already (a retried write): still True
    trials = {t.number: t for t in study.trials()}
    assert trials[a.number].state == "FAIL" and trials[a.number].reason == "objective val/loss is -inf"
    assert (trials[a.number].last_epoch, trials[a.number].last_value) == (1, float("inf"))
    frozen = study.storage.get_trial(a.trial_id)
    assert frozen.intermediate_values == {0: 1.0, 1: float("inf")}
    assert (trials[b.number].state, trials[b.number].value, trials[b.number].last_value) == (
        "COMPLETE",
        0.25,
        -1.5,
    )
    for finished in (a, b):
        with pytest.raises(UpdateFinishedTrialError):
            study.report(finished, 5.0, 7)
        with pytest.raises(UpdateFinishedTrialError):
            study.heartbeat(finished)
    assert study.finish(b, TrialState.FAIL, reason="late") is False
    # a trial declared lost: its worker's late writes are refused, its retry owns the result
    c = study.claim("slow")
    assert study.recover_stale(now=time.time() + 3600) == [c.number]
    with pytest.raises(UpdateFinishedTrialError):
        study.report(c, 1.0, 0)
    assert study.finish(c, TrialState.COMPLETE, 1.0) is False
    retry = next(t for t in study.trials() if t.state == "WAITING" and t.attempt == 2)
    assert retry.key == trials[c.number].key and retry.params == trials[c.number].params


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


def _set_connections(url: str, allowed: bool) -> None:
    """Let clients into the database of `url`, or shut it: refuse new connections and end every open
    one (what a worker sees when the server goes away for good)."""
    db = url.rsplit("/", 1)[1]
    admin = sqlalchemy.create_engine(
        url.rsplit("/", 1)[0] + "/postgres", poolclass=sqlalchemy.pool.NullPool, isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.exec_driver_sql(f"ALTER DATABASE {db} WITH ALLOW_CONNECTIONS {str(allowed).lower()}")
        if not allowed:
            conn.exec_driver_sql(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'"
            )
    admin.dispose()


def test_a_worker_whose_storage_stays_down_stops_with_one_line(tmp_path, postgres_db):
    """A real worker mid-trial loses its PostgreSQL database for good: it retries for the lease
    timeout, then ends with exit 1 and one line that says why (no traceback); once the database is
    back, the trial's lease has expired and another worker resumes it from its checkpoint."""
    from tests.test_sweep_study import TINY, make_spec, metric_rows, start_worker, summary_of

    epochs = 16
    spec = make_spec(
        tmp_path,
        "outage",
        overrides=(*TINY, f"trainer.epochs={epochs}"),
        grid={"trainer.lr": [0.001]},
        storage=postgres_db,
        lease={"heartbeat_s": 1, "timeout_s": 4, "max_retries": 1},
    )
    study = SweepStudy.create(spec, tmp_path / "runs")
    storage_module.rdb_engine(study.storage).dispose()  # this process keeps no connection open
    run_dir = study.sweep_dir / "trials" / study.trials()[0].key
    worker = start_worker(study.sweep_dir, "cut")
    log = study.sweep_dir / "cut.log"
    try:
        deadline = time.monotonic() + 90
        while not (run_dir / "checkpoints" / "last.pt").exists():
            assert time.monotonic() < deadline and worker.poll() is None, log.read_text()
            time.sleep(0.05)
        _set_connections(postgres_db, allowed=False)
        t_cut = time.monotonic()
        rc = worker.wait(timeout=60)
        stopped_after = time.monotonic() - t_cut
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        _set_connections(postgres_db, allowed=True)
    text = log.read_text()
    assert rc == 1, text
    assert "Traceback" not in text, text
    (last,) = [line for line in text.splitlines() if "stopped:" in line]
    assert "cut: stopped: sweep outage:" in last and "the sweep storage failed" in last, last
    assert "back in the queue, or will be at its lease end" in last
    print(f"\noutage: {last}")
    assert "transient storage error" in text  # it retried (logged) before giving up
    # it gave up after retrying for most of the lease timeout (4 s), not at the first error, and not
    # much later
    assert 2 <= stopped_after < 30, stopped_after
    assert len(metric_rows(run_dir)) < epochs  # it stopped mid-trial

    # the database is back: the trial is RUNNING with a lease nobody renews; another worker takes it over
    (lost,) = study.trials()
    assert lost.state == "RUNNING" and lost.worker == "cut"
    survivor = start_worker(study.sweep_dir, "after")
    assert survivor.wait(timeout=120) == 0, (study.sweep_dir / "after.log").read_text()
    failed, retry = study.trials()
    assert (
        failed.state == "FAIL"
        and failed.reason.startswith("worker lost: no heartbeat")
        and "cut" in failed.reason
    )
    assert retry.state == "COMPLETE" and retry.attempt == 2 and retry.worker == "after"
    summary = summary_of(run_dir)
    assert summary["status"] == "completed" and summary["resumed_from_epoch"] >= 1
    assert [r["epoch"] for r in metric_rows(run_dir)] == list(range(epochs))
