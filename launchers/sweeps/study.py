"""The trial queue of one sweep, kept in an Optuna study: storage, atomic claims, leases, retries.

The whole budget is enqueued once, when the sweep is created, as WAITING trials (grid points x seeds
with fixed params; empty search trials that the sampler fills when they are claimed, so it sees the
latest results). A worker claims a trial with the storage's WAITING -> RUNNING transition, which
succeeds for exactly one process, so no trial runs twice and none is created beyond the budget.

Optuna has no leases for journal storage and only `optimize`-driven ones for RDB, so they live
here: a claimed trial carries a heartbeat (a trial system attr). A RUNNING trial whose heartbeat is
older than `timeout_s` belonged to a dead worker; the process whose RUNNING -> FAIL transition
succeeds (only one can) re-enqueues the same params, seed and trial key with attempt + 1, and the
retry resumes from the run dir's last checkpoint. Heartbeats are wall-clock times, so the hosts of
one sweep need clocks in sync to well below `timeout_s`. A trial claimed inside a SLURM job records
the job id, so that a lost trial's failure says why its job ended (sacct: timeout, preempted, ...).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import DuplicatedStudyError, UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from core.atomic import atomic_write_json
from launchers.sweeps.slurm import JobState, sacct_states
from launchers.sweeps.spec import ParamSpec, SweepError, SweepSpec, trial_key

HEARTBEAT_ATTR = "ablate:heartbeat"  # trial system attr: time.time() of the last heartbeat
SPEC_ATTR = "ablate:spec"  # study user attr: spec.to_dict() of the sweep that created the study
SEED_PARAM = "seed"  # grid trials carry their seed as a categorical param next to the axes
SQLITE_TIMEOUT_S = 300  # workers wait this long for the database lock instead of failing
# Spec fields that do not change which trials a sweep runs: a sweep may be continued with new ones.
OPERATIONAL_FIELDS = frozenset({"path", "workers", "launcher", "heartbeat_s", "timeout_s", "max_retries"})

# Optuna's INFO lines ("A new study created in Journal ...") only repeat what the CLI and workers say
optuna.logging.set_verbosity(optuna.logging.WARNING)


def masked_url(url: str) -> str:
    """`url` with its password replaced by ***, for anything printed or logged."""
    return re.sub(r"^([\w+.-]+://[^:/@]*):[^@]*@", r"\1:***@", url)


def sweep_dir_for(root: Path, name: str) -> Path:
    return Path(root) / "sweeps" / name


def _stable_int(*parts: Any) -> int:
    return int(hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:8], 16)


def _serialize_sqlite(storage: RDBStorage) -> None:
    """Make every SQLite transaction take the write lock at BEGIN.

    pysqlite starts a transaction only at the first write, so two processes can both read a trial
    as WAITING and both claim it; BEGIN IMMEDIATE makes the read and the write one atomic step."""
    import sqlalchemy

    sqlalchemy.event.listen(storage.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))


def open_storage(spec: SweepSpec, sweep_dir: Path) -> BaseStorage:
    """The storage named by `spec.storage`: None -> journal file in the sweep dir (many processes, NFS
    safe), "sqlite" -> `<sweep dir>/optuna.db`, anything else -> an RDB URL (PostgreSQL on clusters)."""
    sweep_dir = Path(sweep_dir)
    if spec.storage is None:
        path = str(sweep_dir / "optuna.journal")
        # a lock left by a killed process is broken after `grace` s; well below the lease timeout, so
        # that a stuck lock cannot delay heartbeats long enough to make live trials look lost
        grace = max(3, min(30, int(spec.timeout_s) // 4))
        return JournalStorage(
            JournalFileBackend(path, lock_obj=JournalFileOpenLock(path, grace_period=grace))
        )
    url = f"sqlite:///{sweep_dir / 'optuna.db'}" if spec.storage == "sqlite" else spec.storage
    if url.startswith("sqlite"):
        # isolation_level=None: pysqlite emits no BEGIN of its own; _serialize_sqlite emits ours
        kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S, "isolation_level": None}}
        rdb = RDBStorage(url, engine_kwargs=kwargs)
        _serialize_sqlite(rdb)
    else:
        rdb = RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    return optuna.storages.get_storage(rdb)  # the cached wrapper Optuna itself uses for RDB


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock between processes (released by the kernel if the holder dies)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_same_sweep(spec: SweepSpec, old: dict[str, Any], sweep_dir: Path, check_storage: bool) -> None:
    """A sweep is continued only with the same trials (operational settings such as workers may change)
    and, when `check_storage`, the same storage: another one would silently start a second study."""
    new = spec.to_dict()
    ignored = OPERATIONAL_FIELDS | ({"storage"} if not check_storage else set())
    keys = sorted(k for k in old.keys() | new.keys() if k not in ignored and old.get(k) != new.get(k))
    if not keys:
        return
    raise SweepError(
        f"{spec.path}: {', '.join(keys)}: sweep '{spec.name}' already exists in {sweep_dir} with other "
        f"{'/'.join(keys)} (see its sweep.json); continue it unchanged, or give the new sweep another name"
    )


def _queue(spec: SweepSpec) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(fixed params, user attrs) of every trial of the budget, in slot order."""
    if spec.mode == "search":
        return [({}, {"slot": slot, "attempt": 1}) for slot in range(spec.budget)]
    queue = []
    for point in spec.grid_points():
        for seed in spec.seeds:
            attrs = {
                "slot": len(queue),
                "attempt": 1,
                "seed": seed,
                "trial_key": trial_key(spec.name, point, seed),
            }
            queue.append(({**point, SEED_PARAM: seed}, attrs))
    return queue


@dataclass(frozen=True)
class Claim:
    """A trial this worker owns until it finishes it (or its lease is lost)."""

    trial: optuna.Trial
    trial_id: int
    number: int
    params: dict[str, Any]  # grid: axis -> label; search: config path -> value (no seed)
    seed: int
    key: str
    run_dir: Path
    overrides: list[str]
    attempt: int


@dataclass(frozen=True)
class TrialRecord:
    """One trial as `ablate status` shows it."""

    number: int
    key: str | None
    state: str  # WAITING | RUNNING | COMPLETE | PRUNED | FAIL
    params: dict[str, Any]
    seed: int | None
    value: float | None
    last_value: float | None  # last intermediate (per-epoch) objective value
    last_epoch: int | None
    heartbeat_age: float | None  # seconds, RUNNING trials only
    worker: str | None
    attempt: int
    reason: str | None  # why it failed
    run_dir: Path | None
    slurm_job: str | None  # the SLURM job that claimed it ("<array>_<task>")
    exit_reason: str | None  # why that job ended, when the trial was lost or given back (timeout, ...)


class SweepStudy:
    """The Optuna study of one sweep and the queue operations workers and the CLI need."""

    def __init__(self, spec: SweepSpec, sweep_dir: Path, storage: BaseStorage) -> None:
        self.spec, self.sweep_dir, self.storage = spec, Path(sweep_dir), storage
        self.study_id = storage.get_study_id_from_name(spec.name)
        self._pruner = spec.make_pruner()
        # QMC draws points from one scrambled sequence shared through the storage: one seed for all
        self._shared_sampler = (
            spec.make_sampler(_stable_int(spec.name)) if spec.sampler["name"] == "qmc" else None
        )
        self._study = self._load(self._shared_sampler or optuna.samplers.RandomSampler())  # enqueues retries

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(cls, spec: SweepSpec, root: Path) -> SweepStudy:
        """Create the sweep (or continue it: idempotent, safe when run concurrently) and enqueue its
        budget exactly once. A sweep of that name with a different spec is an error."""
        sweep_dir = sweep_dir_for(root, spec.name)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with _file_lock(sweep_dir / ".create.lock"):
            saved = sweep_dir / "sweep.json"
            if saved.exists():
                _check_same_sweep(spec, json.loads(saved.read_text()), sweep_dir, check_storage=True)
            storage = open_storage(spec, sweep_dir)
            with suppress(DuplicatedStudyError):
                optuna.create_study(study_name=spec.name, storage=storage, direction=spec.direction)
            study = optuna.load_study(study_name=spec.name, storage=storage)
            if SPEC_ATTR in study.user_attrs:  # e.g. a PostgreSQL study that another sweep dir created
                _check_same_sweep(spec, study.user_attrs[SPEC_ATTR], sweep_dir, check_storage=False)
            study.set_user_attr(SPEC_ATTR, spec.to_dict())
            atomic_write_json(saved, spec.to_dict())
            enqueued = {t.user_attrs.get("slot") for t in study.get_trials(deepcopy=False)}
            for slot, (params, attrs) in enumerate(_queue(spec)):
                if slot not in enqueued:  # only slots a create killed half-way did not enqueue
                    study.enqueue_trial(params, user_attrs=attrs)
        return cls(spec, sweep_dir, storage)

    @classmethod
    def open(cls, sweep: str | Path, root: Path | None = None) -> SweepStudy:
        """An existing sweep, by its directory or by name under `root` ($ABLATE_ROOT or ./runs)."""
        path = Path(sweep)
        if not (path / "sweep.json").exists():
            path = sweep_dir_for(root or Path(os.environ.get("ABLATE_ROOT") or "runs"), str(sweep))
        if not (path / "sweep.json").exists():
            raise SweepError(f"{path}: no sweep here (no sweep.json); create it with `ablate sweep {sweep}`")
        spec = SweepSpec.from_dict(json.loads((path / "sweep.json").read_text()))
        storage = open_storage(spec, path)
        try:
            return cls(spec, path, storage)
        except KeyError as exc:
            where = masked_url(spec.storage) if spec.storage else "its journal file"
            raise SweepError(f"{path}: no study '{spec.name}' in {where}: storage lost or moved") from exc

    def _load(self, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
        return optuna.load_study(
            study_name=self.spec.name, storage=self.storage, sampler=sampler, pruner=self._pruner
        )

    # ------------------------------------------------------------------ claims
    def claim(self, worker: str, slurm_job: str | None = None) -> Claim | None:
        """Atomically take a WAITING trial (after recovering trials of dead workers); None if none.
        `slurm_job`: the claiming worker's SLURM job id, recorded on the trial."""
        self.recover_stale()
        for frozen in self.storage.get_all_trials(
            self.study_id, deepcopy=False, states=(TrialState.WAITING,)
        ):
            try:
                if not self.storage.set_trial_state_values(frozen._trial_id, TrialState.RUNNING):
                    continue  # another worker got it first
            except UpdateFinishedTrialError:
                continue
            try:
                return self._start(frozen._trial_id, frozen.number, worker, slurm_job)
            except Exception as exc:
                self._fail(frozen._trial_id, f"claim failed: {type(exc).__name__}: {exc}")
                raise
        return None

    def _start(self, trial_id: int, number: int, worker: str, slurm_job: str | None) -> Claim:
        spec = self.spec
        # a fresh sampler per trial: concurrent claims draw differently, a trial's draw is reproducible
        sampler = self._shared_sampler or spec.make_sampler(_stable_int(spec.name, number))
        trial = optuna.Trial(self._load(sampler), trial_id)
        attrs = trial.user_attrs
        if spec.mode == "grid":
            params = {
                axis: trial.suggest_categorical(axis, [label for label, _ in values])
                for axis, values in spec.grid
            }
            seed = trial.suggest_categorical(SEED_PARAM, list(spec.seeds))
        else:
            params = {p.path: _suggest(trial, p) for p in spec.params}
            seed = attrs.get("seed", spec.seeds[attrs.get("slot", number) % len(spec.seeds)])
        key = trial_key(spec.name, params, seed)
        attempt = int(attrs.get("attempt", 1))
        for name, value in {"trial_key": key, "seed": seed, "worker": worker, "attempt": attempt}.items():
            trial.set_user_attr(name, value)
        # the dashboard's trial table: the group label (grid axes or search values) and the run's folder
        trial.set_user_attr("label", ", ".join(f"{k}={v}" for k, v in params.items()))
        trial.set_user_attr("run_dir", str(self.sweep_dir / "trials" / key))
        trial.set_user_attr("claimed_at", time.time())
        if slurm_job is not None:
            trial.set_user_attr("slurm_job", slurm_job)
        claim = Claim(
            trial=trial,
            trial_id=trial_id,
            number=number,
            params=params,
            seed=seed,
            key=key,
            run_dir=self.sweep_dir / "trials" / key,
            overrides=spec.trial_overrides(params, seed),
            attempt=attempt,
        )
        self.heartbeat(claim)
        return claim

    def heartbeat(self, claim: Claim) -> None:
        """Renew the lease; raises UpdateFinishedTrialError once the trial was declared lost."""
        self.storage.set_trial_system_attr(claim.trial_id, HEARTBEAT_ATTR, time.time())

    # ------------------------------------------------------------------ leases and retries
    def recover_stale(self, now: float | None = None) -> list[int]:
        """Fail RUNNING trials without a heartbeat for `timeout_s` and re-enqueue them (within
        `max_retries`); returns the numbers of the trials this call failed. The failure says why the
        trial's SLURM job ended, from one sacct call for all of them (none when nothing is stale)."""
        now = time.time() if now is None else now
        running = self.storage.get_all_trials(self.study_id, deepcopy=False, states=(TrialState.RUNNING,))
        ages = [(t, now - _last_beat(t)) for t in running]
        stale = [(t, age) for t, age in ages if age > self.spec.timeout_s]
        jobs = sacct_states(t.user_attrs["slurm_job"] for t, _ in stale if "slurm_job" in t.user_attrs)
        recovered = []
        for frozen, age in stale:
            reason, attrs = lost_reason(frozen, age, jobs)
            if self._fail_and_retry(frozen, reason, limited=True, attrs=attrs):
                recovered.append(frozen.number)
        return recovered

    def requeue(self, claim: Claim, reason: str) -> bool:
        """Give back a trial this worker cannot finish (interrupted, preempted): FAIL it and enqueue
        its retry at once, whatever `max_retries` says (the retry resumes, so it makes progress).
        Where sacct already says how the worker's SLURM job ends (a cancel, a time limit: Slurm
        records it before it signals), the failure says so too; submitit's USR2 ahead of a time
        limit finds the job still RUNNING and adds nothing."""
        frozen = self.storage.get_trial(claim.trial_id)
        job_id = frozen.user_attrs.get("slurm_job")
        what, why = job_outcome(frozen.user_attrs, sacct_states([job_id] if job_id else []))
        reason, attrs = (f"{reason}: {what}", {"exit_reason": why}) if why else (reason, {})
        return self._fail_and_retry(frozen, reason, limited=False, attrs=attrs)

    def _fail(self, trial_id: int, reason: str, attrs: dict[str, Any] | None = None) -> bool:
        """RUNNING -> FAIL with `reason` (and user `attrs`); False if the trial had already finished
        (another process won)."""
        try:
            for name, value in {**(attrs or {}), "fail_reason": reason}.items():
                self.storage.set_trial_user_attr(trial_id, name, value)
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            return False
        return True

    def _fail_and_retry(
        self, frozen: FrozenTrial, reason: str, limited: bool, attrs: dict[str, Any] | None = None
    ) -> bool:
        # only the process whose FAIL transition succeeds enqueues: one retry however many noticed
        if not self._fail(frozen._trial_id, reason, attrs):
            return False
        attempt = int(frozen.user_attrs.get("attempt", 1))
        if limited and attempt >= self.spec.max_retries + 1:
            return True
        attrs = {k: frozen.user_attrs[k] for k in ("slot", "seed", "trial_key") if k in frozen.user_attrs}
        self._study.enqueue_trial(
            dict(frozen.params), user_attrs={**attrs, "attempt": attempt + 1, "retry_of": frozen.number}
        )
        return True

    # ------------------------------------------------------------------ results
    def finish(
        self, claim: Claim, state: TrialState, value: float | None = None, reason: str | None = None
    ) -> bool:
        """Record the outcome: COMPLETE with the objective value, PRUNED (Optuna keeps the last
        reported value) or FAIL with `reason` (not retried: an error in a trial is a real failure).
        False if the trial had been declared lost meanwhile (its retry owns the result)."""
        if state == TrialState.COMPLETE and (value is None or not math.isfinite(value)):
            state, reason = TrialState.FAIL, f"objective {self.spec.metric} is {value}"
        if state == TrialState.FAIL:
            return self._fail(claim.trial_id, reason or "failed")
        if self.storage.get_trial(claim.trial_id).state != TrialState.RUNNING:
            return False
        try:
            claim.trial.study.tell(claim.trial, value if state == TrialState.COMPLETE else None, state=state)
        except UpdateFinishedTrialError:
            return False
        return True

    def trials(self) -> list[TrialRecord]:
        now = time.time()
        records = []
        for t in self.storage.get_all_trials(self.study_id, deepcopy=False):
            attrs = t.user_attrs
            params = {k: v for k, v in t.params.items() if not (self.spec.mode == "grid" and k == SEED_PARAM)}
            key = attrs.get("trial_key")
            last_epoch = max(t.intermediate_values, default=None)
            records.append(
                TrialRecord(
                    number=t.number,
                    key=key,
                    state=t.state.name,
                    params=params,
                    seed=attrs.get("seed"),
                    value=t.value,
                    last_value=None if last_epoch is None else t.intermediate_values[last_epoch],
                    last_epoch=last_epoch,
                    heartbeat_age=now - _last_beat(t) if t.state == TrialState.RUNNING else None,
                    worker=attrs.get("worker"),
                    attempt=int(attrs.get("attempt", 1)),
                    reason=attrs.get("fail_reason") if t.state == TrialState.FAIL else None,
                    run_dir=self.sweep_dir / "trials" / key if key else None,
                    slurm_job=attrs.get("slurm_job"),
                    exit_reason=attrs.get("exit_reason"),
                )
            )
        return records

    def remaining_work(self) -> tuple[int, int]:
        """(waiting, running) trials."""
        states = [t.state for t in self.storage.get_all_trials(self.study_id, deepcopy=False)]
        return states.count(TrialState.WAITING), states.count(TrialState.RUNNING)


def job_outcome(attrs: dict[str, Any], jobs: dict[str, JobState]) -> tuple[str, str]:
    """What Slurm says of the job that claimed a trial (its user `attrs`): a description for the
    failure reason ("" outside SLURM) and why the job ended ("" when it is unknown: no accounting,
    or as far as Slurm knows it still runs: a stalled worker, or Slurm has not noticed yet)."""
    job_id = attrs.get("slurm_job")
    if job_id is None:
        return "", ""
    job = jobs.get(job_id)
    if job is None:
        return f"slurm job {job_id} (state unknown: no sacct, or it lags)", ""
    if not job.exit_reason and job.start is not None and job.start > attrs.get("claimed_at", math.inf):
        # live again, started after the claim: stopped and requeued, the trial's run is gone
        return f"{job.describe()} again after a requeue", "requeued"
    return job.describe(), job.exit_reason


def lost_reason(frozen: FrozenTrial, age: float, jobs: dict[str, JobState]) -> tuple[str, dict[str, Any]]:
    """The failure reason of a trial whose worker stopped beating, and the user attrs that say why
    its SLURM job ended (see `job_outcome`)."""
    reason = f"worker lost: no heartbeat for {age:.0f} s (worker {frozen.user_attrs.get('worker', '?')})"
    what, why = job_outcome(frozen.user_attrs, jobs)
    return (f"{reason}: {what}" if what else reason), ({"exit_reason": why} if why else {})


def _last_beat(frozen: FrozenTrial) -> float:
    beat = frozen.system_attrs.get(HEARTBEAT_ATTR)
    if beat is not None:
        return float(beat)
    start = frozen.datetime_start  # claimed but died before its first heartbeat
    return start.timestamp() if start is not None else time.time()


def _suggest(trial: optuna.Trial, p: ParamSpec) -> Any:
    """Suggest a search parameter with its ParamSpec's distribution (a retry gets its fixed value)."""
    if p.type == "float":
        return trial.suggest_float(p.path, p.low, p.high, step=p.step, log=p.log)
    if p.type == "int":
        return trial.suggest_int(p.path, p.low, p.high, step=p.step or 1, log=p.log)
    return trial.suggest_categorical(p.path, list(p.choices))
