"""The storage under a sweep's queue: opening it (bounded connections), riding out transient errors,
and the few operations where Optuna's one-trial-at-a-time API is what makes a sweep slow.

- Journal file (the default): appends are serialised by an flock on a lock file. The kernel queues
  the waiters and releases the lock of a killed process at once, where Optuna's lock-file default
  polls with a back-off up to 1 s (64 workers: multi-second tails) and needs a grace period to
  break the lock of a dead process. Linux maps flock to POSIX locks on NFS, so it holds there too.
- RDB (SQLite, PostgreSQL): one connection per process (pool_size 1, plus one more only while two
  threads need one at once), so a PostgreSQL server needs max_connections above the number of
  workers, with some headroom (or a pooler in front). A claim is one `UPDATE ... WHERE trial_id =
  (SELECT ... FOR UPDATE SKIP LOCKED)`, the lease's INSERT and a read of the trial's params and
  attrs in one transaction, instead of reading every WAITING trial; a heartbeat, a report and a
  grid trial's finish are one write each (Optuna's ORM paths take four or five round trips each,
  which at 256 workers on 2 cores doubled the wall time); enqueueing (COPY on PostgreSQL) and
  counting are one transaction each. These go through Optuna's own table models
  (optuna.storages._rdb.models), whose meaning they keep (tests/test_sweep_queue.py checks it on
  every storage).
- Transient errors (connection refused, dropped or exhausted, deadlocks, serialisation failures,
  failed commits, a busy SQLite, an NFS hiccup) are retried with jittered exponential back-off and
  logged; when they persist for the sweep's lease timeout the operation raises StorageUnavailable.
"""

from __future__ import annotations

import enum
import fcntl
import functools
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import optuna
import sqlalchemy
from optuna.exceptions import StorageInternalError, UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import BaseJournalBackend, JournalFileBackend
from optuna.storages.journal._file import BaseJournalFileLock
from optuna.trial import FrozenTrial, TrialState

SQLITE_TIMEOUT_S = 300  # workers wait this long for the database lock instead of failing
CONNECT_TIMEOUT_S = 10
TRANSIENT_ERRORS = (
    StorageInternalError,  # Optuna's wrapper of a failed commit (deadlock, serialisation, dropped link)
    sqlalchemy.exc.OperationalError,  # connection refused/lost/exhausted, database locked
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,  # no pooled connection in time
    OSError,  # journal file on a shared filesystem
)
log = logging.getLogger("ablate.sweepstate")
T = TypeVar("T")


class StorageUnavailable(RuntimeError):
    """The sweep's storage failed for longer than the retries' patience; the message says what and why."""


# `scheme://user:PASSWORD@` anywhere in a text (greedy to the last @ of the token: a raw @ in a password)
_URL_PASSWORD = re.compile(r"([A-Za-z][\w+.-]*://[^\s:/@'\"]*):[^\s'\"]*@")
# libpq-style `password=...` (a DSN echoed in a driver's message)
_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)


def mask_secrets(text: str) -> str:
    """`text` (a storage URL, or a message that may quote one) with every password in a URL or DSN
    replaced by ***: for anything printed, logged or served."""
    return _KEYWORD_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1:***@", text))


def retrying(operation: Callable[[], T], what: str, patience_s: float) -> T:
    """`operation()`, retried on transient storage errors with jittered exponential back-off (0.05 s
    doubling to 5 s, each wait x0.5-1.5 so that workers that failed together do not retry together);
    StorageUnavailable once the errors have lasted `patience_s`."""
    start, delay, failures = time.monotonic(), 0.05, 0
    while True:
        try:
            return operation()
        except TRANSIENT_ERRORS as exc:
            failures += 1
            elapsed = time.monotonic() - start
            summary = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if elapsed + delay > patience_s:
                raise StorageUnavailable(
                    f"{what}: the sweep storage failed {failures} time(s) over {elapsed:.0f} s "
                    f"(last: {summary})"
                ) from exc
            wait = delay * random.uniform(0.5, 1.5)
            log.warning("%s: transient storage error (%s); retry %d in %.2f s", what, summary, failures, wait)
            time.sleep(wait)
            delay = min(delay * 2, 5.0)


class FlockLock(BaseJournalFileLock):
    """The journal's write lock: fcntl.flock on `<journal>.lock` (see the module docstring)."""

    def __init__(self, journal_path: str) -> None:
        self._path = f"{journal_path}.lock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self._path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def storage_url(storage: str | None, sweep_dir: Path) -> str | None:
    """The RDB URL of a sweep file's `storage` (None: the journal file)."""
    if storage is None:
        return None
    return f"sqlite:///{Path(sweep_dir) / 'optuna.db'}" if storage == "sqlite" else storage


def open_storage(storage: str | None, sweep_dir: Path, patience_s: float = 60.0) -> BaseStorage:
    """The storage a sweep file names: None -> journal file in the sweep dir (many processes, NFS
    safe), "sqlite" -> `<sweep dir>/optuna.db`, anything else -> an RDB URL (PostgreSQL on clusters).
    Connecting is retried like any storage operation (a server restarting, its slots exhausted)."""
    url = storage_url(storage, sweep_dir)
    if url is None:
        path = str(Path(sweep_dir) / "optuna.journal")
        return JournalStorage(JournalFileBackend(path, lock_obj=FlockLock(path)))
    if url.startswith("sqlite"):
        # isolation_level=None: pysqlite emits no BEGIN of its own; _serialize_sqlite emits ours
        kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S, "isolation_level": None}}
    else:
        # one connection per process, checked before use (a restarted server); a second one only
        # while two threads need one at once (Optuna's own setup nests two sessions; a heartbeat
        # during a report), closed again at once
        # (no pool_pre_ping: a round trip per operation; a dropped connection fails the operation,
        # which is retried on a fresh one)
        kwargs = {
            "pool_size": 1,
            "max_overflow": 1,
            "pool_timeout": patience_s,
            "connect_args": {"connect_timeout": CONNECT_TIMEOUT_S} if url.startswith("postgresql") else {},
        }
    rdb = retrying(lambda: RDBStorage(url, engine_kwargs=kwargs), f"open {mask_secrets(url)}", patience_s)
    if url.startswith("sqlite"):
        _serialize_sqlite(rdb)
    # not Optuna's cached wrapper (optuna.storages.get_storage): it re-reads every unfinished trial
    # on each get_all_trials, whatever `states` asks for, so with thousands of WAITING trials each
    # lease check would load all of them
    return rdb


def _serialize_sqlite(storage: RDBStorage) -> None:
    """Make every SQLite transaction take the write lock at BEGIN.

    pysqlite starts a transaction only at the first write, so two processes can both read a trial
    as WAITING and both claim it; BEGIN IMMEDIATE makes the read and the write one atomic step."""
    sqlalchemy.event.listen(storage.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))


def rdb_engine(storage: BaseStorage) -> sqlalchemy.Engine | None:
    """The SQLAlchemy engine under an RDB storage (None for a journal)."""
    return storage.engine if isinstance(storage, RDBStorage) else None


def _tables() -> Any:
    from optuna.storages._rdb import models

    return models


# ---------------------------------------------------------------------------------------------- claims


def claim_next_rdb(engine: sqlalchemy.Engine, study_id: int, attr: str, value: Any) -> FrozenTrial | None:
    """WAITING -> RUNNING for the oldest WAITING trial no other transaction holds, with the system
    attr `attr` = `value` (the lease), in one transaction that also reads what the claimer needs (the
    trial's number, params and user attrs; no intermediate values: it was WAITING); None when none is
    waiting. PostgreSQL (and MySQL) skip rows another claim has locked instead of waiting for them;
    SQLite serialises the whole transaction (BEGIN IMMEDIATE)."""
    models = _tables()
    trials = models.TrialModel.__table__
    oldest = (
        sqlalchemy.select(trials.c.trial_id)
        .where(trials.c.study_id == study_id, trials.c.state == TrialState.WAITING)
        .order_by(trials.c.trial_id)
        .limit(1)
    )
    if engine.dialect.name != "sqlite":
        oldest = oldest.with_for_update(skip_locked=True)
    started = datetime.now()
    claim = (
        sqlalchemy.update(trials)
        .where(trials.c.trial_id == oldest.scalar_subquery(), trials.c.state == TrialState.WAITING)
        .values(state=TrialState.RUNNING, datetime_start=started)
        .returning(trials.c.trial_id, trials.c.number)
    )
    params = models.TrialParamModel.__table__
    user = models.TrialUserAttributeModel.__table__
    with engine.begin() as conn:
        row = conn.execute(claim).one_or_none()
        if row is None:
            return None
        trial_id, number = row
        system = models.TrialSystemAttributeModel.__table__
        conn.execute(
            sqlalchemy.insert(system).values(trial_id=trial_id, key=attr, value_json=json.dumps(value))
        )
        param_rows = conn.execute(
            sqlalchemy.select(params.c.param_name, params.c.param_value, params.c.distribution_json).where(
                params.c.trial_id == trial_id
            )
        ).all()
        attr_rows = conn.execute(
            sqlalchemy.select(user.c.key, user.c.value_json).where(user.c.trial_id == trial_id)
        ).all()
    dists = {name: _distribution(dist_json) for name, _, dist_json in param_rows}
    return FrozenTrial(
        number=number,
        state=TrialState.RUNNING,
        value=None,
        values=None,
        datetime_start=started,
        datetime_complete=None,
        params={name: dists[name].to_external_repr(internal) for name, internal, _ in param_rows},
        distributions=dists,
        user_attrs={key: json.loads(v) for key, v in attr_rows},
        system_attrs={attr: value},
        intermediate_values={},
        trial_id=trial_id,
    )


@functools.lru_cache(maxsize=1024)
def _distribution(dist_json: str) -> optuna.distributions.BaseDistribution:
    """A param's distribution from its stored JSON (the same few strings for every trial of a grid)."""
    return optuna.distributions.json_to_distribution(dist_json)


def _running(trial_id: int) -> Any:
    """The condition that trial `trial_id` is RUNNING (a correlated EXISTS for a write's WHERE)."""
    trials = _tables().TrialModel.__table__
    return (
        sqlalchemy.select(trials.c.trial_id)
        .where(trials.c.trial_id == trial_id, trials.c.state == TrialState.RUNNING)
        .exists()
    )


def set_running_attr_rdb(engine: sqlalchemy.Engine, trial_id: int, attr: str, value: Any) -> None:
    """Rewrite the system attr `attr` (written at the claim) of a RUNNING trial, in one statement
    (Optuna's set_trial_system_attr takes four round trips); UpdateFinishedTrialError when the
    trial is no longer RUNNING."""
    attrs = _tables().TrialSystemAttributeModel.__table__
    update = (
        sqlalchemy.update(attrs)
        .where(attrs.c.trial_id == trial_id, attrs.c.key == attr, _running(trial_id))
        .values(value_json=json.dumps(value))
    )
    with engine.begin() as conn:
        if conn.execute(update).rowcount != 1:
            raise UpdateFinishedTrialError(f"trial {trial_id} is no longer RUNNING (or has no {attr})")


def report_rdb(engine: sqlalchemy.Engine, trial_id: int, step: int, value: float) -> None:
    """Record the intermediate value of `step` of a RUNNING trial in one statement (Optuna's
    Trial.report reads the trial and then writes it: five round trips). A step already reported keeps
    its first value, as Trial.report does; UpdateFinishedTrialError when the trial is not RUNNING."""
    model = _tables().TrialIntermediateValueModel
    table = model.__table__
    stored, kind = model.intermediate_value_to_stored_repr(value)
    reported = (
        sqlalchemy.select(table.c.trial_id).where(table.c.trial_id == trial_id, table.c.step == step).exists()
    )
    row = sqlalchemy.select(
        sqlalchemy.literal(trial_id),
        sqlalchemy.literal(step),
        sqlalchemy.literal(stored, table.c.intermediate_value.type),
        sqlalchemy.literal(kind, table.c.intermediate_value_type.type),
    ).where(_running(trial_id), ~reported)
    insert = sqlalchemy.insert(table).from_select(
        ["trial_id", "step", "intermediate_value", "intermediate_value_type"], row
    )
    with engine.begin() as conn:
        inserted = conn.execute(insert.execution_options(preserve_rowcount=True)).rowcount == 1
        if inserted or conn.execute(sqlalchemy.select(_running(trial_id))).scalar():
            return
    raise UpdateFinishedTrialError(f"trial {trial_id} is no longer RUNNING")


def finish_rdb(engine: sqlalchemy.Engine, trial_id: int, state: TrialState, value: float) -> bool:
    """RUNNING -> `state` (finished) with the objective `value`, in one transaction of two statements
    (Optuna's set_trial_state_values: four); False when the trial was no longer RUNNING."""
    models = _tables()
    trials, values = models.TrialModel.__table__, models.TrialValueModel.__table__
    finish = (
        sqlalchemy.update(trials)
        .where(trials.c.trial_id == trial_id, trials.c.state == TrialState.RUNNING)
        .values(state=state, datetime_complete=datetime.now())
    )
    stored, kind = models.TrialValueModel.value_to_stored_repr(value)
    with engine.begin() as conn:
        if conn.execute(finish).rowcount != 1:
            return False
        conn.execute(
            sqlalchemy.insert(values).values(trial_id=trial_id, objective=0, value=stored, value_type=kind)
        )
    return True


def count_states(storage: BaseStorage, study_id: int) -> dict[TrialState, int]:
    """Trials per state, without loading them (one GROUP BY on an RDB)."""
    engine = rdb_engine(storage)
    if engine is None:
        counts: dict[TrialState, int] = {}
        for t in storage.get_all_trials(study_id, deepcopy=False):
            counts[t.state] = counts.get(t.state, 0) + 1
        return counts
    trials = _tables().TrialModel.__table__
    query = (
        sqlalchemy.select(trials.c.state, sqlalchemy.func.count())
        .where(trials.c.study_id == study_id)
        .group_by(trials.c.state)
    )
    with engine.connect() as conn:
        return dict(conn.execute(query).all())


# ---------------------------------------------------------------------------------------------- enqueue


class _CollectingBackend(BaseJournalBackend):
    """Holds the journal entries a batch of operations writes, so that they go out in one append."""

    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []

    def read_logs(self, log_number_from: int) -> Any:
        return iter(())  # nothing is written while the batch collects: the sync after it reads all

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        self.logs.extend(logs)


def add_waiting_trials(storage: BaseStorage, study_id: int, trials: Sequence[FrozenTrial]) -> None:
    """Create WAITING trials (params, distributions and attrs as in `trials`) in one write: one
    journal append, or one transaction of a few multi-row INSERTs. Creating them one by one costs a
    locked append or a transaction with a study-row lock each (10,000 trials: minutes on PostgreSQL)."""
    if not trials:
        return
    if isinstance(storage, JournalStorage):
        real = storage._backend
        batch = storage._backend = _CollectingBackend()
        # create_new_trial returns the id of this process's last created trial, which the replay
        # sets only once one was written: nothing is written while the batch collects
        replay = storage._replay_result
        if not hasattr(replay, "_last_created_trial_id_by_this_process"):
            replay._last_created_trial_id_by_this_process = -1
        try:
            for t in trials:  # Optuna writes each entry as it would; the batch keeps them
                storage.create_new_trial(study_id, template_trial=t)
        finally:
            storage._backend = real
        real.append_logs(batch.logs)
        storage._sync_with_backend()
        return
    _add_waiting_rdb(rdb_engine(storage), study_id, trials)


def _add_waiting_rdb(engine: sqlalchemy.Engine, study_id: int, trials: Sequence[FrozenTrial]) -> None:
    models = _tables()
    tbl = {
        name: getattr(models, name).__table__
        for name in ("StudyModel", "TrialModel", "TrialParamModel", "TrialUserAttributeModel")
    }
    system = models.TrialSystemAttributeModel.__table__
    with engine.begin() as conn:
        # the study row's lock orders trial numbers, as Optuna's create_new_trial does
        studies = tbl["StudyModel"]
        conn.execute(
            sqlalchemy.select(studies.c.study_id).where(studies.c.study_id == study_id).with_for_update()
        )
        t = tbl["TrialModel"]
        first = conn.execute(
            sqlalchemy.select(sqlalchemy.func.count()).where(t.c.study_id == study_id)
        ).scalar()
        rows = [
            {"number": first + i, "study_id": study_id, "state": TrialState.WAITING, "datetime_start": None}
            for i in range(len(trials))
        ]
        _insert(conn, t, rows)
        ids = dict(
            conn.execute(
                sqlalchemy.select(t.c.number, t.c.trial_id).where(
                    t.c.study_id == study_id, t.c.number >= first
                )
            ).all()
        )
        params, user, sys_attrs = [], [], []
        for i, trial in enumerate(trials):
            tid = ids[first + i]
            for name, value in trial.params.items():
                dist = trial.distributions[name]
                params.append(
                    {
                        "trial_id": tid,
                        "param_name": name,
                        "param_value": dist.to_internal_repr(value),
                        "distribution_json": optuna.distributions.distribution_to_json(dist),
                    }
                )
            user += [
                {"trial_id": tid, "key": k, "value_json": json.dumps(v)} for k, v in trial.user_attrs.items()
            ]
            sys_attrs += [
                {"trial_id": tid, "key": k, "value_json": json.dumps(v)}
                for k, v in trial.system_attrs.items()
            ]
        for table, rows in (
            (tbl["TrialParamModel"], params),
            (tbl["TrialUserAttributeModel"], user),
            (system, sys_attrs),
        ):
            _insert(conn, table, rows)


def _insert(conn: sqlalchemy.Connection, table: sqlalchemy.Table, rows: list[dict[str, Any]]) -> None:
    """Insert `rows` (dicts with the same keys) in the connection's transaction. PostgreSQL through
    psycopg 3: one COPY (a 10,000-trial grid's 120,000 rows spent most of their time in the driver
    splitting multi-row INSERT texts for parameters). Elsewhere one executemany, which the RETURNING of
    the primary key makes SQLAlchemy send as multi-row INSERTs of 1000 ("insertmanyvalues")."""
    if not rows:
        return
    if conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg":
        quote = conn.dialect.identifier_preparer.quote
        columns = list(rows[0])
        sql = f"COPY {quote(table.name)} ({', '.join(map(quote, columns))}) FROM STDIN"
        with conn.connection.driver_connection.cursor() as cursor, cursor.copy(sql) as copy:
            for row in rows:
                # an Enum column (a trial's state) is stored by its member's name, as SQLAlchemy does
                copy.write_row([v.name if isinstance(v, enum.Enum) else v for v in row.values()])
        return
    conn.execute(sqlalchemy.insert(table).returning(*table.primary_key.columns), rows)
