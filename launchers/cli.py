"""The `ablate` command line. Exit codes: 0 ok, 1 a run failed, 2 bad usage/config/input,
75 a run stopped by SIGTERM/SIGUSR2 after saving its checkpoint (EX_TEMPFAIL: run it again to resume)."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from core.train.signals import ctrl_c_interrupts, stop_on_signals
from launchers.config import compose_experiment
from launchers.prepare_data import add_parser as add_prepare_data
from launchers.validate import (
    BUILD_ERRORS,
    EXIT_FAILED,
    EXIT_USAGE,
    UsageError,
    build_error_message,
    check_output_dir,
    check_storage,
    classify,
    mask_secrets,
    positive_int,
)

EXIT_OK, EXIT_INTERRUPTED = 0, 75


def results_root(arg: str | None) -> Path:
    return Path(arg or os.environ.get("ABLATE_ROOT") or "runs")


def check_root(arg: str | None) -> None:
    """The results root can hold what a command is about to write (checked before it writes)."""
    option = "--root" if arg else "ABLATE_ROOT" if os.environ.get("ABLATE_ROOT") else "results root"
    check_output_dir(option, results_root(arg))


def new_run_dir(root: Path, experiment: str) -> Path:
    """runs/<experiment>/<timestamp>-<random>: unique even for runs started in the same second."""
    return root / experiment / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _print_summary(summary: dict) -> None:
    rows = {
        **{f"best/{k}": v["value"] for k, v in summary.get("best", {}).items()},
        **{k: v for k, v in summary.get("eval", {}).items() if k.startswith("test/")},
    }
    width = max(map(len, rows), default=0)
    print(
        f"\n{summary['experiment']}: {summary['status']} after {summary.get('epochs_run', 0)} epochs "
        f"({summary.get('wall_time_s', 0):.1f} s)"
    )
    for k, v in rows.items():
        print(f"  {k:<{width}}  {v:.4f}")


def cmd_run(args: argparse.Namespace) -> int:
    """Run one experiment inline. SIGTERM or SIGUSR2 (a cluster's time limit or preemption) stop it after
    the current batch with a mid-epoch checkpoint: it prints the command that resumes it (the same
    overrides with --run-dir) and exits with EXIT_INTERRUPTED, distinct from success and failure so
    that a job script can requeue itself."""
    from core.train.distributed import context_from_env

    # torch is imported only when a run is asked for
    from core.train.loop import Interrupted, Trainer
    from core.train.run import build_task, run_experiment, trainer_config
    from launchers.tracking import ConsoleReporter, Reporters, WandbReporter

    cfg = compose_experiment(args.experiment, args.overrides)
    if args.run_dir:
        check_output_dir("--run-dir", Path(args.run_dir))
    else:
        check_root(args.root)
    if args.dry_run:
        print(OmegaConf.to_yaml(cfg, resolve=True), end="")
        return EXIT_OK
    main_rank = context_from_env().is_main  # a data-parallel launch (torchrun, SLURM tasks): rank 0 speaks
    if args.run_dir:
        run_dir = Path(args.run_dir)
        saved = run_dir / "config.yaml"
        if saved.exists() and OmegaConf.load(saved) != OmegaConf.create(OmegaConf.to_yaml(cfg, resolve=True)):
            raise UsageError(
                f"{run_dir} holds a run with a different config; resume it with the same overrides"
            )
    else:
        run_dir = new_run_dir(results_root(args.root), args.experiment)
    try:
        task = build_task(cfg, run_dir)  # bad data fails here, before anything is written
        Trainer(task, trainer_config(cfg, task.best_checkpoints), run_dir)  # optimizer, scheduler: no writes
    except BUILD_ERRORS as exc:  # the data or model that the config describes cannot be built
        raise UsageError(f"experiment '{args.experiment}': {build_error_message(exc, cfg)}") from exc
    run_dir.mkdir(parents=True, exist_ok=True)
    reporters = [ConsoleReporter(cfg.trainer.epochs)]
    wandb_reporter = None
    summary: dict = {}
    try:
        if cfg.logger.enabled and main_rank:
            wandb_reporter = WandbReporter(
                cfg, run_dir, group=args.experiment, job_type=cfg.family, tags=list(cfg.logger.tags)
            )
            reporters.append(wandb_reporter)
        print(f"run dir: {run_dir}", file=sys.stderr)
        with stop_on_signals():
            summary = run_experiment(cfg, run_dir, Reporters(reporters), task=task, overrides=args.overrides)
    except Interrupted as exc:
        again = shlex.join(["ablate", "run", args.experiment, *args.overrides, "--run-dir", str(run_dir)])
        print(f"ablate: {exc}\nresume it with: {again}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if wandb_reporter is not None:
            wandb_reporter.finish(
                summary, exit_code=0 if summary.get("status") in ("completed", "pruned") else 1
            )
    if main_rank:
        _print_summary(summary)
        print(run_dir)
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from core.train.run import checkpoint_names, checkpoint_path, evaluate_run

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").exists():
        raise UsageError(f"{run_dir}: not a run directory (no config.yaml)")
    names = checkpoint_names(OmegaConf.load(run_dir / "config.yaml"))
    checkpoint = args.checkpoint or names[0]
    if checkpoint not in names:
        raise UsageError(f"--checkpoint {checkpoint}: this run keeps {', '.join(names)}")
    if not checkpoint_path(run_dir, checkpoint).exists():
        raise UsageError(f"{run_dir}: no '{checkpoint}' checkpoint ({checkpoint_path(run_dir, checkpoint)})")
    _check_checkpoint(checkpoint_path(run_dir, checkpoint))
    metrics = evaluate_run(run_dir, checkpoint)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    print(f"wrote {run_dir / 'eval' / (checkpoint + '.json')}", file=sys.stderr)
    return EXIT_OK


def _check_checkpoint(path: Path) -> None:
    """A truncated or corrupt checkpoint is bad input naming the file, not a failed evaluation."""
    import pickle
    import zipfile

    from core.train.checkpoint import load_checkpoint

    try:
        load_checkpoint(path)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        reason = str(exc).split(". ")[0].strip() or type(exc).__name__  # torch's first sentence
        raise UsageError(f"{path}: not a readable checkpoint (truncated or corrupt?): {reason}") from exc


def cmd_rerun(args: argparse.Namespace) -> int:
    from launchers.rerun import rerun, run_dir_of

    root = results_root(args.root)
    try:
        run_dir = run_dir_of(args.target, root)
        experiment = json.loads((run_dir / "provenance.json").read_text())["experiment"]
        return rerun(run_dir, new_run_dir(root, experiment))  # `ablate run` prints the new run dir
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _submitter(launcher: str, spec):
    """The function submitting workers for `launcher`; resources are checked before anything is created."""
    if launcher == "slurm":
        from launchers.sweeps.slurm import slurm_resources, submit_slurm_workers

        try:
            resources = slurm_resources(spec.launcher)
        except ValueError as exc:
            raise UsageError(f"{spec.path}: {exc}") from exc
        return lambda sweep_dir, n: submit_slurm_workers(sweep_dir, n, resources)
    from launchers.sweeps.local import submit_local_workers

    return submit_local_workers


def _submit(study, args: argparse.Namespace) -> int:
    """Submit workers for what is left (never more workers than waiting trials) and maybe wait."""
    from launchers.sweeps.status import format_status

    launcher = args.launcher or study.spec.launcher.get("name", "local")
    submit = _submitter(launcher, study.spec)
    workers = args.workers if args.workers is not None else study.spec.workers  # --workers is >= 1
    wait, sweep_dir = args.wait, study.sweep_dir

    study.recover_stale()
    waiting, running = study.remaining_work()
    n = min(workers, waiting)
    if n == 0:
        print(f"nothing to submit: {waiting} waiting, {running} running", file=sys.stderr)
    else:
        jobs = submit(sweep_dir, n)
        print(f"submitted {n} {launcher} worker(s): {', '.join(j.job_id for j in jobs)}", file=sys.stderr)
        print(f"logs: {sweep_dir / 'workers'}", file=sys.stderr)
        if wait:
            for job in jobs:
                job.wait()
    if wait or n == 0:
        print(format_status(study))
    else:
        print(f"follow it with: ablate status {study.spec.name}", file=sys.stderr)
    print(sweep_dir)
    return EXIT_OK


def cmd_sweep(args: argparse.Namespace) -> int:
    from launchers.snapshot import require_clean, use_code
    from launchers.sweeps.slurm import trial_job_outcomes
    from launchers.sweeps.spec import load_sweep
    from sweepstate.study import SweepStudy

    spec = load_sweep(args.sweep, args.overrides)
    _submitter(args.launcher or spec.launcher.get("name", "local"), spec)  # check resources first
    check_root(args.root)
    from_override = any(o.partition("=")[0].lstrip("+~") == "storage" for o in args.overrides)
    check_storage(spec.storage, f"{spec.path}{' (overridden)' if from_override else ''}")
    if args.require_clean:
        require_clean()
    study = SweepStudy.create(spec, results_root(args.root), trial_job_outcomes)
    use_code(study, Path(spec.path) if spec.path else None, replace=False)
    return _submit(study, args)


def _open(args: argparse.Namespace):
    from launchers.sweeps.slurm import trial_job_outcomes
    from sweepstate.study import SweepStudy

    root = results_root(args.root)
    saved = root / "sweeps" / args.sweep / "sweep.json"
    if not saved.exists():
        raise UsageError(
            f"no sweep '{args.sweep}' under {root / 'sweeps'}; start it with: ablate sweep {args.sweep}"
        )
    try:
        storage = json.loads(saved.read_text()).get("storage")
    except (ValueError, AttributeError) as exc:
        raise UsageError(f"{saved}: not a sweep record ({exc})") from exc
    check_storage(storage, str(saved))
    return SweepStudy.open(args.sweep, root, trial_job_outcomes)


def cmd_resume(args: argparse.Namespace) -> int:
    from launchers.snapshot import use_code

    study = _open(args)
    use_code(study, None, replace=args.code == "current")
    return _submit(study, args)


def cmd_table(args: argparse.Namespace) -> int:
    from analysis.commands import table_command

    try:
        text = table_command(
            args.sweep,
            results_root(args.root),
            args.by,
            args.metric,
            {"md": "markdown"}.get(args.format, args.format),
            args.baseline,
            args.test,
            args.stat,
            args.pool_code,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    print(text)
    return EXIT_OK


def cmd_plot(args: argparse.Namespace) -> int:
    from analysis.commands import plot_command

    target = Path(args.target)
    if not target.exists() and (len(target.parts) > 1 or args.target.startswith(".")):
        raise UsageError(f"{args.target}: no such run directory (a sweep is named without a '/')")
    try:
        paths = plot_command(args.target, results_root(args.root))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    for path in paths:
        print(path)
    return EXIT_OK


def cmd_dashboard(args: argparse.Namespace) -> int:
    from launchers.dashboard import DashboardError, serve

    try:
        serve(_open(args), args.host, args.port)
    except DashboardError as exc:
        raise UsageError(str(exc)) from exc
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import report_command

    try:
        path = report_command(args.sweep, results_root(args.root), args.format, args.out, args.stat)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    print(path)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from launchers.sweeps.status import format_status, status_json_lines

    study = _open(args)
    print(status_json_lines(study) if args.json else format_status(study))
    return EXIT_OK


def cmd_sync(args: argparse.Namespace) -> int:
    from launchers.sync import format_runs, offline_runs, sync_target, upload

    root = results_root(args.root)
    try:
        folder = sync_target(args.target, root) if args.target else root
        runs = offline_runs(folder)
        print(format_runs(runs, folder), flush=True)  # before wandb's own output
        if args.dry_run:
            print("dry run: nothing uploaded", file=sys.stderr)
            return EXIT_OK
        left = upload(runs)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if left:
        print(f"ablate: {left} run(s) still not synced (see wandb's messages above)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ablate", description="Experiment orchestration and ablation for video-representation research."
    )
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run one experiment inline and print its run dir")
    r.add_argument("experiment", help="a name in experiments/experiment/")
    r.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. trainer.epochs=5 loss/alignment=tcc debug=fast"
    )
    r.add_argument("--launcher", choices=["inline"], default="inline", help="where the run executes")
    r.add_argument("--root", help="results root (default: $ABLATE_ROOT or ./runs)")
    r.add_argument("--run-dir", help="an explicit run directory; resumes from its last.pt if present")
    r.add_argument(
        "--dry-run", action="store_true", help="compose and check the config and print it; write nothing"
    )
    r.set_defaults(func=cmd_run)

    sw = sub.add_parser("sweep", help="create or continue a sweep and submit its workers")
    sw.add_argument("sweep", help="a name in sweeps/ or a path to a sweep .yaml")
    sw.add_argument("overrides", nargs="*", help="overrides of the sweep file, e.g. search.n_trials=8")
    sw.add_argument(
        "--require-clean",
        action="store_true",
        help="refuse a checkout with uncommitted changes",
    )
    rs = sub.add_parser("resume", help="submit workers for what is left of a sweep")
    rs.add_argument("sweep", help="the sweep's name")
    rs.add_argument(
        "--code",
        choices=["sweep", "current"],
        default="sweep",
        help="code the new workers run: the sweep's snapshot (default) or a new one of this checkout",
    )
    for q in (sw, rs):
        q.add_argument(
            "--launcher",
            choices=["local", "slurm"],
            help="where workers run (default: the sweep file's launcher.name)",
        )
        q.add_argument("--workers", type=positive_int, help="number of workers (default: the sweep file's)")
        q.add_argument(
            "--wait", action="store_true", help="block until the workers finish, then print status"
        )
        q.add_argument("--root", help="results root (default: $ABLATE_ROOT or ./runs)")
    sw.set_defaults(func=cmd_sweep)
    rs.set_defaults(func=cmd_resume)

    st = sub.add_parser("status", help="trial counts, best so far, running trials and failures of a sweep")
    st.add_argument("sweep")
    st.add_argument("--json", action="store_true", help="one JSON object per trial")
    st.add_argument("--root", help="results root (default: $ABLATE_ROOT or ./runs)")
    st.set_defaults(func=cmd_status)

    tb = sub.add_parser("table", help="a sweep's results aggregated over seeds, with CIs and paired tests")
    tb.add_argument("sweep")
    tb.add_argument("--by", nargs="+", help="axes to group by (default: all ablation axes)")
    tb.add_argument("--metric", help="metric column (default: the sweep's objective, last epoch)")
    tb.add_argument("--format", choices=["md", "markdown", "csv", "latex"], default="md")
    tb.add_argument("--baseline", help="the row others are tested against (default: the first)")
    tb.add_argument(
        "--test", choices=["wilcoxon", "ttest"], default="wilcoxon", help="paired test over seeds"
    )
    tb.add_argument(
        "--stat",
        choices=["mean", "median", "iqm"],
        default="mean",
        help="aggregate over seeds (iqm: rliable's)",
    )
    tb.add_argument(
        "--pool-code", action="store_true", help="pool trials that ran different code into one row"
    )
    tb.add_argument("--root", help="results root (default: $ABLATE_ROOT or ./runs)")
    tb.set_defaults(func=cmd_table)

    pl = sub.add_parser("plot", help="plots of a sweep or a run dir (PNG); prints their paths")
    pl.add_argument("target", help="a sweep name or a run directory")
    pl.add_argument("--root", help="results root (default: $ABLATE_ROOT or ./runs)")
    pl.set_defaults(func=cmd_plot)

    db = sub.add_parser(
        "dashboard", help="optuna-dashboard on a sweep's storage (read-only; ablate[dashboard])"
    )
    db.add_argument("sweep")
    db.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    db.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0: any free one)")
    db.add_argument("--root", help="results root (default: $ABLATE_ROOT or ./runs)")
    db.set_defaults(func=cmd_dashboard)

    rp = sub.add_parser("report", help="one self-contained HTML (or markdown) report of a sweep")
    rp.add_argument("sweep")
    rp.add_argument("--format", choices=["html", "md"], default="html")
    rp.add_argument("--out", help="file to write (default: <sweep dir>/report/report.html or .md)")
    rp.add_argument("--stat", choices=["mean", "median", "iqm"], default="mean", help="aggregate over seeds")
    rp.add_argument("--root", help="results root (default: $ABLATE_ROOT or ./runs)")
    rp.set_defaults(func=cmd_report)

    sy = sub.add_parser("sync", help="upload offline wandb runs with `wandb sync` (from a host online)")
    sy.add_argument("target", nargs="?", help="a sweep, a run dir or a folder (default: the results root)")
    sy.add_argument("--dry-run", action="store_true", help="list the offline runs and what would be uploaded")
    sy.add_argument("--root", help="results root (default: $ABLATE_ROOT or ./runs)")
    sy.set_defaults(func=cmd_sync)

    rr = sub.add_parser("rerun", help="run a recorded run again with its code, config and seed")
    rr.add_argument("target", help="a run directory, or SWEEP:TRIAL_KEY")
    rr.add_argument("--root", help="results root for the new run (default: $ABLATE_ROOT or ./runs)")
    rr.set_defaults(func=cmd_rerun)

    e = sub.add_parser("eval", help="evaluate a run's checkpoint on its own test split")
    e.add_argument("run_dir")
    e.add_argument(
        "--checkpoint", help="best_model_<NAME>.pt or 'last' (default: the family's main one, e.g. combined)"
    )
    e.set_defaults(func=cmd_eval)
    add_prepare_data(sub)
    return p


class _Parser(argparse.ArgumentParser):
    """argparse that never prints a password: its messages quote the arguments it rejects."""

    def error(self, message: str):
        super().error(mask_secrets(message))


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Options and overrides in any order (`ablate sweep demo --workers 2 storage=...`): the subcommand's
    parser reads the rest with intermixed parsing, which argparse offers only for a parser without
    subcommands."""
    argv = sys.argv[1:] if argv is None else list(argv)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if argv and argv[0] in sub.choices:
        return sub.choices[argv[0]].parse_intermixed_args(argv[1:], argparse.Namespace(command=argv[0]))
    return parser.parse_args(argv)  # help, or no/unknown command: argparse's own message


def main(argv: list[str] | None = None) -> int:
    ctrl_c_interrupts()
    parser = build_parser()
    try:
        args = parse_args(parser, argv)
    except SystemExit as exc:  # argparse: help (0) or a usage error (2), its message already printed
        return exc.code if isinstance(exc.code, int) else EXIT_OK if exc.code is None else EXIT_USAGE
    try:
        return args.func(args)
    except BrokenPipeError:  # `ablate status x | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_OK
    except Exception as exc:  # bad input (exit 2) or a run that failed (exit 1: its summary.json says why)
        code, message = classify(exc)
        print(message, file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
