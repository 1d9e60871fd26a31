"""Bad input told apart from a failed run, and the checks that catch it before anything is written.

The CLI's contract: a mistake in what the user gave (an override, a file, a URL, a path, an option, data
on disk) exits 2 with one message naming the culprit, and nothing is created - no run dir, no sweep
dir, no lock, no wandb run. Only a failure of the run itself exits 1. Every message leaves this module
with credentials masked, whichever library wrote it.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from sweepstate.storage import mask_secrets

EXIT_FAILED, EXIT_USAGE = 1, 2
STORAGE_CONNECT_TIMEOUT_S = 5  # an unreachable database server fails the check in seconds, not minutes

# numpy's words for a .npy it refuses to unpickle, which advise loading it "unsafely": never passed on
_PICKLE_ADVICE = re.compile(
    r"This file contains pickled \(object\) data\..*?(pickle\.load\(\)`?\.?|$)"
    r"|Object arrays cannot be loaded when allow_pickle=False"
)
_NO_PICKLE = "not a numeric .npy array (pickled or object data is never loaded)"


class UsageError(ValueError):
    """Bad input from the user: the message names the key, option or file; exit 2, nothing written."""


def input_error_types() -> tuple[type[Exception], ...]:
    """Exception classes that mean bad input wherever they are raised (config, sweep file, data)."""
    from core.data.errors import DataError
    from launchers.config import ConfigError
    from sweepstate.spec import SweepError

    return (UsageError, ConfigError, SweepError, DataError)


def classify(exc: BaseException) -> tuple[int, str]:
    """(exit code, message) for an exception that reached the CLI; the message is safe to print."""
    if isinstance(exc, input_error_types()):
        code, message = EXIT_USAGE, f"ablate: error: {exc}"
    else:
        code, message = EXIT_FAILED, f"ablate: run failed: {type(exc).__name__}: {exc}"
    return code, _PICKLE_ADVICE.sub(_NO_PICKLE, mask_secrets(message))


# What building a run's data and model from its config raises when the config or the data is wrong: a
# data file (DataError, OSError), a value the loader rejects (ValueError), a key deleted with ~key
# (OmegaConf's errors), keys a constructor does not take (TypeError, KeyError), a size or device torch
# cannot use (RuntimeError). Raised before the run dir exists, so a bug surfaces here as exit 2 too,
# with its exception named in the message.
BUILD_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    OSError,
    TypeError,
    KeyError,
    RuntimeError,
    OmegaConfBaseException,
)


def build_error_message(exc: Exception, cfg: DictConfig) -> str:
    """The message of a BUILD_ERRORS exception, with the config keys it is about named."""
    if isinstance(exc, OmegaConfBaseException):
        key = exc.full_key or "a key"
        return f"{key} is needed but missing ({str(exc).splitlines()[0]})"
    message = name_config_keys(str(exc).strip() or type(exc).__name__, cfg, "data")
    return message if isinstance(exc, ValueError | OSError) else f"{type(exc).__name__}: {message}"


def name_config_keys(message: str, cfg: DictConfig, section: str) -> str:
    """`message` with the bare keys of `cfg.<section>` written as config paths (annotation_fps ->
    data.annotation_fps): a loader knows its arguments, the user knows the config. Only keys with an
    underscore, which no file path or plain word is mistaken for."""
    keys = sorted((str(k) for k in cfg.get(section) or {} if "_" in str(k)), key=len, reverse=True)
    for key in keys:
        message = re.sub(rf"(?<![\w./\\-]){re.escape(key)}(?![\w/\\-]|\.\w)", f"{section}.{key}", message)
    return message


# ---------------------------------------------------------------- options


def positive_int(text: str) -> int:
    """argparse type of --workers: an integer >= 1 (a count of processes to submit)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def check_output_dir(option: str, path: Path) -> None:
    """`path` is a directory or can be created as one (by this user); checked before anything is written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path}: exists and is not a directory")
    ancestor = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not ancestor.is_dir():
        raise UsageError(f"{option} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: {ancestor} is not writable")


# ---------------------------------------------------------------- storage


def check_storage(url: str | None, where: str) -> None:
    """A sweep's `storage` URL (None: journal file, "sqlite": in the sweep dir) names a known dialect whose
    driver is installed and a server that answers with these credentials, within a few seconds.
    `where` names the file (and key) the URL came from. Connects, but creates nothing: a file database
    (SQLite) is not opened, only its folder is checked."""
    if url is None or url == "sqlite":
        return
    import sqlalchemy
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    shown = mask_secrets(url)
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except NoSuchModuleError:  # an ArgumentError too: first
        raise UsageError(
            f"{where}: storage: unknown database dialect '{parsed.drivername}' in {shown} "
            "(e.g. postgresql://, postgresql+psycopg://, mysql+pymysql://, sqlite:///)"
        ) from None
    except (ArgumentError, ValueError) as exc:
        raise UsageError(f"{where}: storage: {shown} is not a database URL ({exc})") from None
    except ImportError as exc:
        raise UsageError(
            f"{where}: storage: the driver for {shown} is not installed ({exc}); "
            "for PostgreSQL: pip install 'ablate[postgres]'"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not Path(database).parent.is_dir():
            raise UsageError(f"{where}: storage: {shown}: no such folder {Path(database).parent}")
        return
    timed = dialect.name in ("postgresql", "mysql")
    timeout = {"connect_timeout": STORAGE_CONNECT_TIMEOUT_S} if timed else {}
    engine = None
    try:
        engine = sqlalchemy.create_engine(parsed, connect_args=timeout, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect():
            pass
    except ImportError as exc:
        raise UsageError(
            f"{where}: storage: the driver for {shown} is not installed ({exc}); "
            "for PostgreSQL: pip install 'ablate[postgres]'"
        ) from None
    except SQLAlchemyError as exc:
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
        raise UsageError(f"{where}: storage: cannot connect to {shown}: {reason}") from None
    finally:
        if engine is not None:
            engine.dispose()
