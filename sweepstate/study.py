"""The trial queue of one sweep, kept in an Optuna study: atomic claims, leases, retries.

The whole budget is enqueued once, when the sweep is created, as WAITING trials (grid points x seeds
with their params already set; empty search trials that the sampler fills when they are claimed, so
it sees the latest results). A worker claims a trial with the storage's WAITING -> RUNNING
transition, which succeeds for exactly one process, so no trial runs twice and none is created
beyond the budget. Concurrent claims do not queue on one trial: on an RDB a claim takes the oldest
trial no other claim holds (SKIP LOCKED); on the journal a worker that lost the race for the oldest
tries the next few in its own random order.

Optuna has no leases for journal storage and only `optimize`-driven ones for RDB, so they live
here: a claimed trial carries a lease (a trial system attr: worker, claim time, SLURM job, last
heartbeat), written once at the claim and rewritten by each heartbeat. A RUNNING trial whose
heartbeat is older than `timeout_s` belonged to a dead worker; the process whose RUNNING -> FAIL
transition succeeds (only one can) re-enqueues the same params, seed and trial key with attempt + 1,
and the retry resumes from the run dir's last checkpoint. Heartbeats are wall-clock times, so the
hosts of one sweep need clocks in sync to well below `timeout_s`. A trial claimed inside a SLURM job
records the job id, so that a lost trial's failure says why its job ended (timeout, preempted, ...):
the launcher that knows how to ask injects that as `job_outcomes`; this module knows no launcher.
Every storage operation rides out transient errors (sweepstate.storage.retrying).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import DuplicatedStudyError, UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from core.atomic import atomic_write_json, file_lock
from sweepstate.spec import ParamSpec, SweepError, SweepSpec, trial_key
from sweepstate.storage import (
    TRANSIENT_ERRORS,
    add_waiting_trials,
    claim_next_rdb,
    count_states,
    finish_rdb,
    mask_secrets,
    open_storage,
    rdb_engine,
    report_rdb,
    retrying,
    set_running_attr_rdb,
)

LEASE_ATTR = "ablate:lease"  # trial system attr: {worker, claimed_at, slurm_job, beat} of a claimed trial
SPEC_ATTR = "ablate:spec"  # study user attr: spec.to_dict() of the sweep that created the study
SEED_PARAM = "seed"  # grid trials carry their seed as a categorical param next to the axes
# Spec fields that do not change which trials a sweep runs: a sweep may be continued with new ones.
OPERATIONAL_FIELDS = frozenset({"path", "workers", "launcher", "heartbeat_s", "timeout_s", "max_retries"})

# Why the jobs that claimed some trials ended, from the trials' leases (one batched query for all):
# per trial (what the job's state says, for the failure reason; why it ended, "" when unknown).
JobOutcomes = Callable[[list[dict[str, Any]]], list[tuple[str, str]]]


def no_job_accounting(leases: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The `JobOutcomes` of a sweep read without a launcher (analysis, local workers): nothing known."""
    return [("", "")] * len(leases)


# Optuna's INFO lines ("A new study created in Journal ...") only repeat what the CLI and workers say
optuna.logging.set_verbosity(optuna.logging.WARNING)


def sweep_dir_for(root: Path, name: str) -> Path:
    return Path(root) / "sweeps" / name


def _stable_int(*parts: Any) -> int:
    return int(hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:8], 16)


def lease_of(frozen: FrozenTrial) -> dict[str, Any]:
    """The lease of a claimed trial ({} for one never claimed)."""
    return frozen.system_attrs.get(LEASE_ATTR) or {}


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


def _shown(sweep_dir: Path, params: dict[str, Any], key: str) -> dict[str, str]:
    """User attrs for people reading the study (optuna-dashboard's trial table): the trial's group
    label (its axis labels or search values) and its run folder."""
    return {
        "label": ", ".join(f"{k}={v}" for k, v in params.items()),
        "run_dir": str(sweep_dir / "trials" / key),
    }


def _queue(spec: SweepSpec, sweep_dir: Path) -> list[FrozenTrial]:
    """The WAITING trials of the whole budget, in slot order: a grid trial with its params (axis
    labels and seed) and what a reader needs already set, a search trial with its slot and seed (the
    sampler fills it)."""
    if spec.mode == "search":
        return [
            _waiting({}, {}, {"slot": slot, "attempt": 1, "seed": spec.seeds[slot % len(spec.seeds)]})
            for slot in range(spec.budget)
        ]
    dists = {
        axis: optuna.distributions.CategoricalDistribution([lb for lb, _ in values])
        for axis, values in spec.grid
    }
    dists[SEED_PARAM] = optuna.distributions.CategoricalDistribution(list(spec.seeds))
    queue = []
    for point in spec.grid_points():
        for seed in spec.seeds:
            key = trial_key(spec.name, point, seed)
            attrs = {"slot": len(queue), "attempt": 1, "seed": seed, "trial_key": key}
            attrs.update(_shown(sweep_dir, point, key))
            queue.append(_waiting({**point, SEED_PARAM: seed}, dists, attrs))
    return queue


def _waiting(params: dict[str, Any], dists: dict[str, Any], user_attrs: dict[str, Any]) -> FrozenTrial:
    """A WAITING trial to enqueue. (Not optuna.trial.create_trial: its checks of every distribution
    took most of the time to create a 10,000-trial grid; these params come from their distributions.)"""
    return FrozenTrial(
        number=-1,
        state=TrialState.WAITING,
        value=None,
        values=None,
        datetime_start=None,
        datetime_complete=None,
        params=params,
        distributions=dists,
        user_attrs=user_attrs,
        system_attrs={},
        intermediate_values={},
        trial_id=-1,
    )


@dataclass(frozen=True)
class Claim:
    """A trial this worker owns until it finishes it (or its lease is lost)."""

    trial: optuna.Trial | None  # a search trial's (the sampler suggests through it); None for a grid trial
    trial_id: int
    number: int
    params: dict[str, Any]  # grid: axis -> label; search: config path -> value (no seed)
    seed: int
    key: str
    run_dir: Path
    overrides: list[str]
    attempt: int
    lease: dict[str, Any]  # as written at the claim; each heartbeat rewrites it with a new `beat`


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

    def __init__(
        self,
        spec: SweepSpec,
        sweep_dir: Path,
        storage: BaseStorage,
        job_outcomes: JobOutcomes = no_job_accounting,
    ) -> None:
        self.spec, self.sweep_dir, self.storage = spec, Path(sweep_dir), storage
        self.job_outcomes = job_outcomes
        self._engine = rdb_engine(storage)
        # a journal claim tries the oldest WAITING trials in this process's own order (see claim)
        self._rng = random.Random(f"{os.getpid()}-{time.time_ns()}")
        self._last_recovery = -math.inf
        self.study_id = self._retry(lambda: storage.get_study_id_from_name(spec.name), "open the study")
        self._pruner = spec.make_pruner()
        # QMC draws points from one scrambled sequence shared through the storage: one seed for all
        self._shared_sampler = (
            spec.make_sampler(_stable_int(spec.name)) if spec.sampler["name"] == "qmc" else None
        )
        self._study = self._retry(
            lambda: optuna.load_study(
                study_name=spec.name,
                storage=storage,
                sampler=self._shared_sampler or optuna.samplers.RandomSampler(),
                pruner=self._pruner,
            ),
            "load the study",
        )

    def _retry(self, operation: Callable[[], Any], what: str) -> Any:
        """`operation` through transient storage errors for up to the lease timeout: longer, and the
        trials of this worker are declared lost anyway (StorageUnavailable then)."""
        return retrying(operation, f"sweep {self.spec.name}: {what}", self.spec.timeout_s)

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(cls, spec: SweepSpec, root: Path, job_outcomes: JobOutcomes = no_job_accounting) -> SweepStudy:
        """Create the sweep (or continue it: idempotent, safe when run concurrently) and enqueue its
        budget exactly once, in one write. A sweep of that name with a different spec is an error."""
        sweep_dir = sweep_dir_for(root, spec.name)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with file_lock(sweep_dir / ".create.lock"):
            saved = sweep_dir / "sweep.json"
            if saved.exists():
                _check_same_sweep(spec, json.loads(saved.read_text()), sweep_dir, check_storage=True)
            storage = open_storage(spec.storage, sweep_dir, spec.timeout_s)
            with suppress(DuplicatedStudyError):
                optuna.create_study(study_name=spec.name, storage=storage, direction=spec.direction)
            study = optuna.load_study(study_name=spec.name, storage=storage)
            if SPEC_ATTR in study.user_attrs:  # e.g. a PostgreSQL study that another sweep dir created
                _check_same_sweep(spec, study.user_attrs[SPEC_ATTR], sweep_dir, check_storage=False)
            study.set_user_attr(SPEC_ATTR, spec.to_dict())
            atomic_write_json(saved, spec.to_dict())
            # the enqueue is one write: a create killed half-way enqueued all its trials or none
            if not count_states(storage, study._study_id):
                add_waiting_trials(storage, study._study_id, _queue(spec, sweep_dir))
        return cls(spec, sweep_dir, storage, job_outcomes)

    @classmethod
    def open(
        cls, sweep: str | Path, root: Path | None = None, job_outcomes: JobOutcomes = no_job_accounting
    ) -> SweepStudy:
        """An existing sweep, by its directory or by name under `root` ($ABLATE_ROOT or ./runs)."""
        path = Path(sweep)
        if not (path / "sweep.json").exists():
            path = sweep_dir_for(root or Path(os.environ.get("ABLATE_ROOT") or "runs"), str(sweep))
        if not (path / "sweep.json").exists():
            raise SweepError(f"{path}: no sweep here (no sweep.json); create it with `ablate sweep {sweep}`")
        spec = SweepSpec.from_dict(json.loads((path / "sweep.json").read_text()))
        storage = open_storage(spec.storage, path, spec.timeout_s)
        try:
            return cls(spec, path, storage, job_outcomes)
        except KeyError as exc:
            where = mask_secrets(spec.storage) if spec.storage else "its journal file"
            raise SweepError(f"{path}: no study '{spec.name}' in {where}: storage lost or moved") from exc

    # ------------------------------------------------------------------ claims
    def claim(self, worker: str, slurm_job: str | None = None) -> Claim | None:
        """Atomically take a WAITING trial; None if none is waiting. `slurm_job`: the claiming
        worker's SLURM job id, recorded in the lease. (Trials of dead workers come back to the
        queue through `recover_stale`, which the worker loop calls.)"""
        return self._retry(lambda: self._claim(worker, slurm_job), "claim a trial")

    def _claim(self, worker: str, slurm_job: str | None) -> Claim | None:
        now = time.time()
        lease = {"worker": worker, "claimed_at": now, "beat": now}
        if slurm_job is not None:
            lease["slurm_job"] = slurm_job
        for trial_id, claimed in self._candidates(lease):
            if claimed is None:
                try:
                    if not self.storage.set_trial_state_values(trial_id, TrialState.RUNNING):
                        continue  # another worker got it first
                except UpdateFinishedTrialError:
                    continue
            try:
                return self._start(trial_id, lease, claimed)
            except Exception as exc:
                # the storage failed mid-claim: the trial goes back to the queue (the claim is
                # retried); anything else is this trial's own failure
                reason = f"claim failed: {type(exc).__name__}: {exc}"
                if isinstance(exc, TRANSIENT_ERRORS):
                    self._fail_and_retry(self.storage.get_trial(trial_id), reason, limited=False)
                else:
                    self._fail(trial_id, reason)
                raise
        return None

    def _candidates(self, lease: dict[str, Any]) -> Iterator[tuple[int, FrozenTrial | None]]:
        """Trials to try to claim: (trial id, the trial as claimed, or None while still to claim).
        RDB: the one trial a SKIP LOCKED claim already took (with its params, attrs and lease). Journal:
        the oldest WAITING trial, then - once a race for it was lost - the next `workers` in this
        process's own random order, so that concurrent claims stop racing for the same trial."""
        if self._engine is not None:
            claimed = claim_next_rdb(self._engine, self.study_id, LEASE_ATTR, lease)
            if claimed is not None:
                yield claimed._trial_id, claimed
            return
        waiting = self.storage.get_all_trials(self.study_id, deepcopy=False, states=(TrialState.WAITING,))
        if not waiting:
            return
        yield waiting[0]._trial_id, None
        window = max(1, self.spec.workers)
        head = [t._trial_id for t in waiting[1 : window + 1]]
        self._rng.shuffle(head)
        yield from ((trial_id, None) for trial_id in head)
        yield from ((t._trial_id, None) for t in waiting[window + 1 :])

    def _start(self, trial_id: int, lease: dict[str, Any], claimed: FrozenTrial | None) -> Claim:
        """The Claim of a trial this process just moved to RUNNING (`claimed`: as the RDB claim read
        it). A grid trial needs nothing more (its params came with the queue); a search trial's
        params are suggested now, through an Optuna trial."""
        spec = self.spec
        # the lease is the claim's one write; on an RDB the claim's transaction wrote it already
        if claimed is None:
            self.storage.set_trial_system_attr(trial_id, LEASE_ATTR, lease)
        trial = None
        if spec.mode == "grid":
            frozen = claimed or self.storage.get_trial(trial_id)
            params = {axis: frozen.params[axis] for axis, _ in spec.grid}
            seed = frozen.params[SEED_PARAM]
        else:
            # a fresh sampler per trial: concurrent claims draw differently, a trial's draw is reproducible
            number = claimed.number if claimed else self.storage.get_trial(trial_id).number
            self._study.sampler = self._shared_sampler or spec.make_sampler(_stable_int(spec.name, number))
            # the Study's cached RDB wrapper knows only trials it has read, and a claim made in SQL
            # is new to it (its set_trial_param would fail): one read of the study's trials (which
            # the sampler makes anyway) brings it in
            self._study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            trial = optuna.Trial(self._study, trial_id)
            frozen = trial._cached_frozen_trial
            params = {p.path: _suggest(trial, p) for p in spec.params}
            seed = frozen.user_attrs["seed"]
        attrs = frozen.user_attrs
        key = trial_key(spec.name, params, seed)
        if attrs.get("trial_key") != key:  # a search trial: its values are known from now on
            for name, value in {"trial_key": key, **_shown(self.sweep_dir, params, key)}.items():
                self.storage.set_trial_user_attr(trial_id, name, value)
        return Claim(
            trial=trial,
            trial_id=trial_id,
            number=frozen.number,
            params=params,
            seed=seed,
            key=key,
            run_dir=self.sweep_dir / "trials" / key,
            overrides=spec.trial_overrides(params, seed),
            attempt=int(attrs.get("attempt", 1)),
            lease=lease,
        )

    def heartbeat(self, claim: Claim) -> None:
        """Renew the lease (one write); raises UpdateFinishedTrialError once the trial was declared lost."""
        lease = {**claim.lease, "beat": time.time()}
        if self._engine is not None:
            engine = self._engine
            self._retry(lambda: set_running_attr_rdb(engine, claim.trial_id, LEASE_ATTR, lease), "heartbeat")
        else:
            beat = self.storage.set_trial_system_attr
            self._retry(lambda: beat(claim.trial_id, LEASE_ATTR, lease), "heartbeat")

    def report(self, claim: Claim, value: float, step: int) -> bool:
        """Report an intermediate objective value (a step already reported keeps its first value);
        True when the pruner says to stop the trial. Raises UpdateFinishedTrialError once the trial
        was declared lost."""
        value, step = float(value), int(step)
        if claim.trial is not None:  # a search trial: its Optuna trial keeps what the pruner reads
            self._retry(lambda: claim.trial.report(value, step), "report")
        elif self._engine is not None:
            engine = self._engine
            self._retry(lambda: report_rdb(engine, claim.trial_id, step, value), "report")
        else:
            self._retry(lambda: self._report_journal(claim.trial_id, step, value), "report")
        if isinstance(self._pruner, optuna.pruners.NopPruner):
            return False  # (a grid's: nothing to ask)
        trial = claim.trial or optuna.Trial(self._study, claim.trial_id)
        return bool(self._retry(trial.should_prune, "ask the pruner"))

    def _report_journal(self, trial_id: int, step: int, value: float) -> None:
        if step not in self.storage.get_trial(trial_id).intermediate_values:
            self.storage.set_trial_intermediate_value(trial_id, step, value)

    def set_user_attr(self, claim: Claim, key: str, value: Any) -> None:
        """Set a user attr of a claimed trial, for people reading the study (e.g. the code it runs)."""
        self._retry(lambda: self.storage.set_trial_user_attr(claim.trial_id, key, value), f"set {key}")

    # ------------------------------------------------------------------ leases and retries
    def recover_stale(self, now: float | None = None) -> list[int]:
        """Fail RUNNING trials without a heartbeat for `timeout_s` and re-enqueue them (within
        `max_retries`); returns the numbers of the trials this call failed. The failure says why the
        trial's job ended, from one `job_outcomes` call for all of them (none when nothing is stale)."""
        now = time.time() if now is None else now
        self._last_recovery = time.monotonic()
        running = self._retry(
            lambda: self.storage.get_all_trials(self.study_id, deepcopy=False, states=(TrialState.RUNNING,)),
            "read the running trials",
        )
        stale = [(t, now - _last_beat(t)) for t in running]
        stale = [(t, age) for t, age in stale if age > self.spec.timeout_s]
        if not stale:
            return []
        outcomes = self.job_outcomes([lease_of(t) for t, _ in stale])
        recovered = []
        for (frozen, age), outcome in zip(stale, outcomes, strict=True):
            reason, attrs = lost_reason(frozen, age, outcome)
            if self._fail_and_retry(frozen, reason, limited=True, attrs=attrs):
                recovered.append(frozen.number)
        return recovered

    def recover_stale_if_due(self) -> list[int]:
        """`recover_stale`, at most every `heartbeat_s` from one process: a lease needs `timeout_s`
        to expire, and many workers looking at every claim would only load the storage."""
        if time.monotonic() - self._last_recovery < self.spec.heartbeat_s:
            return []
        return self.recover_stale()

    def requeue(self, claim: Claim, reason: str) -> bool:
        """Give back a trial this worker cannot finish (interrupted, preempted): FAIL it and enqueue
        its retry at once, whatever `max_retries` says (the retry resumes, so it makes progress).
        Where `job_outcomes` already says how the worker's job ends (Slurm records a cancel or a
        time limit before it signals), the failure says so too; submitit's USR2 ahead of a time
        limit finds the job still RUNNING and adds nothing."""
        frozen = self._retry(lambda: self.storage.get_trial(claim.trial_id), "read the trial")
        [(what, why)] = self.job_outcomes([lease_of(frozen)])
        reason, attrs = (f"{reason}: {what}", {"exit_reason": why}) if why else (reason, {})
        return self._fail_and_retry(frozen, reason, limited=False, attrs=attrs)

    def _fail(self, trial_id: int, reason: str, attrs: dict[str, Any] | None = None) -> bool:
        """RUNNING -> FAIL with `reason` (and user `attrs`); False if the trial had already finished
        (another process won)."""

        def fail() -> bool:
            try:
                for name, value in {**(attrs or {}), "fail_reason": reason}.items():
                    self.storage.set_trial_user_attr(trial_id, name, value)
                return self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:
                return False

        return self._retry(fail, "fail a trial")

    def _fail_and_retry(
        self, frozen: FrozenTrial, reason: str, limited: bool, attrs: dict[str, Any] | None = None
    ) -> bool:
        # only the process whose FAIL transition succeeds enqueues: one retry however many noticed
        if not self._fail(frozen._trial_id, reason, attrs):
            return False
        attempt = int(frozen.user_attrs.get("attempt", 1))
        if limited and attempt >= self.spec.max_retries + 1:
            return True
        kept = {
            k: frozen.user_attrs[k]
            for k in ("slot", "seed", "trial_key", "label", "run_dir")
            if k in frozen.user_attrs
        }
        retry = _waiting(
            dict(frozen.params),
            dict(frozen.distributions),
            {**kept, "attempt": attempt + 1, "retry_of": frozen.number},
        )
        self._retry(lambda: add_waiting_trials(self.storage, self.study_id, [retry]), "enqueue a retry")
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

        def recorded_before() -> bool:
            # declared lost meanwhile, or this very finish committed before a transient error
            frozen = self.storage.get_trial(claim.trial_id)
            return frozen.state == state and lease_of(frozen).get("claimed_at") == claim.lease["claimed_at"]

        def tell() -> bool:
            try:
                if self.spec.mode == "grid" and state == TrialState.COMPLETE:
                    # no sampler to tell: the one write Optuna's tell ends with (it reads first)
                    if self._engine is not None:
                        return finish_rdb(self._engine, claim.trial_id, state, value) or recorded_before()
                    return self.storage.set_trial_state_values(claim.trial_id, state, [value])
                trial = claim.trial or optuna.Trial(self._study, claim.trial_id)
                self._study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
            except (UpdateFinishedTrialError, ValueError):  # ValueError: "Cannot tell a FAIL trial"
                return recorded_before()
            return True

        return self._retry(tell, "record the outcome")

    def trials(self) -> list[TrialRecord]:
        now = time.time()
        records = []
        frozen_trials = self._retry(
            lambda: self.storage.get_all_trials(self.study_id, deepcopy=False), "read trials"
        )
        for t in frozen_trials:
            attrs, lease = t.user_attrs, lease_of(t)
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
                    worker=lease.get("worker"),
                    attempt=int(attrs.get("attempt", 1)),
                    reason=attrs.get("fail_reason") if t.state == TrialState.FAIL else None,
                    run_dir=self.sweep_dir / "trials" / key if key else None,
                    slurm_job=lease.get("slurm_job"),
                    exit_reason=attrs.get("exit_reason"),
                )
            )
        return records

    def remaining_work(self) -> tuple[int, int]:
        """(waiting, running) trials."""
        counts = self._retry(lambda: count_states(self.storage, self.study_id), "count trials")
        return counts.get(TrialState.WAITING, 0), counts.get(TrialState.RUNNING, 0)


def lost_reason(frozen: FrozenTrial, age: float, outcome: tuple[str, str]) -> tuple[str, dict[str, Any]]:
    """The failure reason of a trial whose worker stopped beating, and the user attrs that say why
    its job ended (`outcome`: one entry of `JobOutcomes`)."""
    reason = f"worker lost: no heartbeat for {age:.0f} s (worker {lease_of(frozen).get('worker', '?')})"
    what, why = outcome
    return (f"{reason}: {what}" if what else reason), ({"exit_reason": why} if why else {})


def _last_beat(frozen: FrozenTrial) -> float:
    beat = lease_of(frozen).get("beat")
    if beat is not None:
        return float(beat)
    start = frozen.datetime_start  # claimed but died before it wrote its lease
    return start.timestamp() if start is not None else time.time()


def _suggest(trial: optuna.Trial, p: ParamSpec) -> Any:
    """Suggest a search parameter with its ParamSpec's distribution (a retry gets its fixed value)."""
    if p.type == "float":
        return trial.suggest_float(p.path, p.low, p.high, step=p.step, log=p.log)
    if p.type == "int":
        return trial.suggest_int(p.path, p.low, p.high, step=p.step or 1, log=p.log)
    return trial.suggest_categorical(p.path, list(p.choices))
