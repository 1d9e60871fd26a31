"""`ablate prepare-data EXPERIMENT [overrides]`: build the frame cache of an experiment's video data.

Run it once per dataset and resolution before the training jobs (e.g. one CPU-heavy SLURM job), so that
no GPU job pays for decoding; an interrupted build resumes where it stopped, and concurrent builders
wait for each other (core/data/cache.py). Training then reads the cache with `data.cache=true`.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from launchers.config import ConfigError, compose_experiment

EXIT_OK = 0


def add_parser(sub: Any) -> None:
    """Register the subcommand on the CLI's subparsers."""
    p = sub.add_parser("prepare-data", help="decode an experiment's video data once into the frame cache")
    p.add_argument("experiment", help="a name in experiments/experiment/ (family video)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=bridge data.root=/data/bridge")
    p.set_defaults(func=cmd_prepare_data)


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from core.data.sources import prepare_cache

    cfg = compose_experiment(args.experiment, [*args.overrides, "++data.cache=true"])
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done == total or done % 100 == 0:
            rate = done / (time.perf_counter() - start)
            print(f"prepare-data: {done}/{total} clips written ({rate:.1f} clips/s)", file=sys.stderr)

    try:
        directory = prepare_cache(cfg.data, progress)
    except ValueError as exc:  # a bad data config or input (DataError): exit code 2
        raise ConfigError(str(exc)) from None
    print(directory)
    return EXIT_OK
