"""The sweep queue under many workers, on each storage, against plain Optuna on the same storage.

    python -m benchmarks.bench_storage --workers 64 --trials 1000 --work-s 2 --storages journal,postgres

For each storage: (1) the time to create a `--create`-trial grid sweep; (2) W worker processes drain an
N-trial grid through the queue (claim -> heartbeat thread -> `--work-s` of sleep standing for the
training -> report -> finish), timing every operation; (3) the anchor, in the same run: W processes of
plain Optuna ask -> suggest -> sleep -> tell on a fresh study of the same storage (Optuna's defaults),
N trials in all. Printed per storage: p50/p99/max of each operation, wall / ideal (ideal = N x work /
W), the largest gap between two heartbeats of one trial (the lease times out after `--timeout-s`),
crashed workers, lost and duplicated trials, transient storage errors retried, and the ratio of the
claim p99 to plain Optuna's ask p99. Workers are forked from this light process (no torch), so that
hundreds fit in memory. PostgreSQL: `--pg-url`, else $ABLATE_TEST_POSTGRES_URL or the URL that
tests/postgres/start_postgres.sh wrote; each run gets a fresh database there.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import TrialState

from sweepstate.spec import GRID_PRUNER, GRID_SAMPLER, SweepSpec
from sweepstate.storage import mask_secrets, rdb_engine
from sweepstate.study import SweepStudy

PG_URL_FILE = Path(os.environ.get("ABLATE_PG_DIR", "/var/tmp/ablate-postgres")) / "url"


def grid_spec(
    name: str, n_trials: int, storage: str | None, workers: int, args: argparse.Namespace
) -> SweepSpec:
    """A grid of `n_trials` points and one seed (nothing here composes a config)."""
    return SweepSpec(
        name=name,
        path=f"{name}.yaml",
        experiment="progress_learnable",
        overrides=(),
        metric="val/loss",
        direction="minimize",
        seeds=(0,),
        mode="grid",
        n_trials=None,
        params=(),
        sampler=GRID_SAMPLER,
        pruner=GRID_PRUNER,
        grid=tuple(
            (f"x{a}", tuple((str(i), (f"x{a}={i}",)) for i in range(k)))
            for a, k in enumerate(_axes(n_trials))
        ),
        storage=storage,
        workers=workers,
        heartbeat_s=args.heartbeat_s,
        timeout_s=args.timeout_s,
        max_retries=1,
        launcher={"name": "local"},
    )


def _axes(n: int) -> list[int]:
    """Axis sizes whose product is `n`, 10 labels each where possible (as real grids: a few short axes;
    each trial stores its axes' label lists)."""
    sizes = []
    while n % 10 == 0 and n > 10:
        sizes.append(10)
        n //= 10
    return [*sizes, n]


class _Counting(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def _queue_worker(sweep_dir: str, name: str, work_s: float, start_at: float, out: str) -> None:
    retries = _Counting()
    logging.getLogger("ablate.sweepstate").addHandler(retries)
    times: dict[str, list[float]] = {"claim": [], "heartbeat": [], "report": [], "finish": []}
    done, max_gap = [], 0.0
    study = SweepStudy.open(Path(sweep_dir))
    time.sleep(max(0.0, start_at - time.time()))

    def timed(op: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        result = fn()
        times[op].append(time.perf_counter() - t0)
        return result

    while True:
        claim = timed("claim", lambda: study.claim(name))
        if claim is None:
            if study.remaining_work()[0] == 0:
                break  # the rest is running elsewhere (nothing fails here: no lease to take over)
            continue
        last_beat, stop = [time.time()], threading.Event()

        def beat(claim=claim, last_beat=last_beat, stop=stop) -> None:
            nonlocal max_gap
            while not stop.wait(study.spec.heartbeat_s):
                timed("heartbeat", lambda: study.heartbeat(claim))
                now = time.time()
                max_gap = max(max_gap, now - last_beat[0])
                last_beat[0] = now

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        time.sleep(work_s)
        timed("report", lambda claim=claim: study.report(claim, float(claim.number), 0))
        stop.set()
        thread.join()
        max_gap = max(max_gap, time.time() - last_beat[0])
        if timed("finish", lambda claim=claim: study.finish(claim, TrialState.COMPLETE, float(claim.number))):
            done.append(claim.number)
    Path(out).write_text(
        json.dumps(
            {"times": times, "done": done, "max_gap": max_gap, "retries": retries.count, "end": time.time()}
        )
    )


def _optuna_worker(url_or_path: str, name: str, n: int, work_s: float, start_at: float, out: str) -> None:
    if url_or_path.endswith(".journal"):
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url_or_path))
    else:
        storage = url_or_path
    study = optuna.load_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler())
    times: dict[str, list[float]] = {"ask": [], "tell": []}
    time.sleep(max(0.0, start_at - time.time()))
    for _ in range(n):
        t0 = time.perf_counter()
        trial = study.ask()
        x = trial.suggest_float("x", 0, 1)
        times["ask"].append(time.perf_counter() - t0)
        time.sleep(work_s)
        t0 = time.perf_counter()
        study.tell(trial, x)
        times["tell"].append(time.perf_counter() - t0)
    Path(out).write_text(json.dumps({"times": times, "end": time.time()}))


def _reporting_crash(target: Any, *args: Any) -> None:
    """Run a worker; if it dies of an exception, leave its one-line summary in its result file."""
    try:
        target(*args)
    except BaseException as exc:
        summary = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        Path(args[-1]).write_text(json.dumps({"crash": mask_secrets(summary)[:200]}))
        os._exit(1)


def _run(target: Any, args_of: list[tuple]) -> tuple[list[dict], str]:
    """Fork one process per args tuple (its last arg: its result file); (results, crashed workers:
    their number and why, by reason)."""
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_reporting_crash, args=(target, *a)) for a in args_of]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    results, crashes = [], Counter()
    for p, a in zip(procs, args_of, strict=True):
        out = json.loads(Path(a[-1]).read_text()) if Path(a[-1]).exists() else {}
        if p.exitcode == 0 and "crash" not in out:
            results.append(out)
        else:
            crashes[out.get("crash", f"exit code {p.exitcode}")] += 1
    crashed = f"{sum(crashes.values())}" + "".join(f" [{n}x {why}]" for why, n in crashes.most_common(3))
    return results, crashed


def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    v = sorted(values)
    p99 = v[min(len(v) - 1, math.ceil(0.99 * len(v)) - 1)]
    return f"{statistics.median(v) * 1e3:.0f}/{p99 * 1e3:.0f}/{v[-1] * 1e3:.0f} ms"


def _p99(values: list[float]) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, math.ceil(0.99 * len(v)) - 1)] if v else math.nan


def _fresh_pg(url: str) -> tuple[str, Any]:
    """A new database on the server of `url`, and a function that drops it."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")

    def drop() -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")

    return url.rsplit("/", 1)[0] + f"/{name}", drop


def bench(kind: str, args: argparse.Namespace, root: Path) -> None:
    w, n, work = args.workers, args.trials, args.work_s
    dbs, drops = [], []
    for _ in range(3 if kind == "postgres" else 0):
        url, drop = _fresh_pg(args.pg_url)
        dbs.append(url)
        drops.append(drop)
    storage = {"journal": None, "sqlite": "sqlite", "postgres": dbs[0] if dbs else None}[kind]
    try:
        where = f"{kind} {mask_secrets(args.pg_url)}" if dbs else kind
        print(
            f"\n== {where}: {w} workers x {n} trials, {work} s each",
            flush=True,
        )
        if args.create:
            create_storage = {"postgres": dbs[2] if dbs else None, "sqlite": "sqlite", "journal": None}[kind]
            t0 = time.perf_counter()
            SweepStudy.create(
                grid_spec("create", args.create, create_storage, w, args), root / kind / "create"
            )
            print(f"create a {args.create}-trial grid: {time.perf_counter() - t0:.2f} s", flush=True)

        t0 = time.perf_counter()
        study = SweepStudy.create(grid_spec("queue", n, storage, w, args), root / kind / "queue")
        print(f"create the {n}-trial grid: {time.perf_counter() - t0:.2f} s", flush=True)
        if (engine := rdb_engine(study.storage)) is not None:
            engine.dispose()  # no connection shared with the forked workers
        start_at = time.time() + 2 + w * 0.02
        out = root / kind / "out"
        out.mkdir(parents=True)
        jobs = [(str(study.sweep_dir), f"w{i}", work, start_at, str(out / f"q{i}.json")) for i in range(w)]
        results, crashed = _run(_queue_worker, jobs)
        wall = max((r["end"] for r in results), default=math.nan) - start_at
        ideal = n * work / w
        done = Counter(t for r in results for t in r["done"])
        trials = study.trials()
        states = Counter(t.state for t in trials)
        lost = n - len({t.key for t in trials if t.state == "COMPLETE"})
        complete = [t.key for t in trials if t.state == "COMPLETE"]
        duplicated = sum(c - 1 for c in done.values() if c > 1) + len(complete) - len(set(complete))
        ops = {
            op: [x for r in results for x in r["times"][op]]
            for op in ("claim", "heartbeat", "report", "finish")
        }
        print(
            "ablate:  " + "; ".join(f"{op} {_stats(v)}" for op, v in ops.items()) + " (p50/p99/max)\n"
            f"         wall {wall:.1f} s / ideal {ideal:.1f} s = {wall / ideal:.2f}; largest heartbeat gap "
            f"{max((r['max_gap'] for r in results), default=math.nan):.1f} s (lease {args.timeout_s:.0f} s); "
            f"crashed {crashed}; lost {lost}; duplicated {duplicated}; states {dict(states)}; "
            f"transient errors retried {sum(r['retries'] for r in results)}",
            flush=True,
        )

        if args.anchor:
            anchor = str(root / kind / "anchor.journal") if kind == "journal" else None
            if kind == "sqlite":
                anchor = f"sqlite:///{root / kind / 'anchor.db'}"
            if kind == "postgres":
                anchor = dbs[1]
            opened = (
                optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(anchor))
                if kind == "journal"
                else anchor
            )
            optuna.create_study(study_name="anchor", storage=opened)
            per = [n // w + (1 if i < n % w else 0) for i in range(w)]
            start_at = time.time() + 2 + w * 0.02
            jobs = [(anchor, "anchor", per[i], work, start_at, str(out / f"o{i}.json")) for i in range(w)]
            o_results, o_crashed = _run(_optuna_worker, jobs)
            o_wall = max((r["end"] for r in o_results), default=math.nan) - start_at
            asks = [x for r in o_results for x in r["times"]["ask"]]
            tells = [x for r in o_results for x in r["times"]["tell"]]
            print(
                f"optuna:  ask {_stats(asks)}; tell {_stats(tells)} (p50/p99/max)\n"
                f"         wall {o_wall:.1f} s / ideal {ideal:.1f} s = {o_wall / ideal:.2f}; "
                f"crashed {o_crashed}\n"
                f"ratio:   ablate claim p99 / optuna ask p99 = {_p99(ops['claim']) / _p99(asks):.2f}; "
                f"wall ablate / optuna = {wall / o_wall:.2f}",
                flush=True,
            )
    finally:
        for drop in drops:
            drop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--storages", default="journal,sqlite,postgres")
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--work-s", type=float, default=0.5)
    p.add_argument("--heartbeat-s", type=float, default=10.0)
    p.add_argument("--timeout-s", type=float, default=60.0)
    p.add_argument("--create", type=int, default=10000, help="trials of the create-time grid (0: skip)")
    p.add_argument("--no-anchor", dest="anchor", action="store_false")
    p.add_argument(
        "--pg-url",
        default=os.environ.get("ABLATE_TEST_POSTGRES_URL")
        or (PG_URL_FILE.read_text().strip() if PG_URL_FILE.exists() else None),
    )
    args = p.parse_args(argv)
    print(
        f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; heartbeat every {args.heartbeat_s} s",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench_storage_") as tmp:
        for kind in args.storages.split(","):
            if kind == "postgres" and not args.pg_url:
                print("\n== postgres: skipped (no --pg-url; start one with tests/postgres/start_postgres.sh)")
                continue
            bench(kind, args, Path(tmp))


if __name__ == "__main__":
    main()
