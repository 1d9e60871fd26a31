"""`ablate sync`: upload the offline wandb runs of a sweep, a run dir or any folder with `wandb sync`.

Compute nodes rarely reach the W&B server, so runs log offline into `<run dir>/wandb/offline-run-*`;
this uploads them later from a host that does. A resumed run (requeue, retry) has one offline folder
per resumption under the same run id: `wandb sync` uploads them in order into the one run. Folders
already uploaded carry wandb's `.synced` marker and are skipped.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OfflineRun:
    """One `wandb/offline-run-<time>-<run id>` folder."""

    path: Path
    run_id: str
    synced: bool


def sync_target(target: str, root: Path) -> Path:
    """The folder `target` names: a path (sweep dir, run dir, any folder), else a sweep under `root`.
    Raises ValueError when it is neither."""
    path = Path(target)
    if path.is_dir():
        return path
    sweep_dir = Path(root) / "sweeps" / target
    if (sweep_dir / "sweep.json").exists():
        return sweep_dir
    raise ValueError(f"{target}: neither a folder nor a sweep under {Path(root) / 'sweeps'}")


def _synced(path: Path) -> bool:
    """wandb marks each uploaded `run-<id>.wandb` file with a `run-<id>.wandb.synced` next to it."""
    return all(f.with_suffix(".wandb.synced").exists() for f in path.glob("run-*.wandb"))


def offline_runs(folder: Path) -> list[OfflineRun]:
    """Every offline wandb run under `folder`, in path order (a run's resumptions in time order).

    The run id is read from the folder's `run-<id>.wandb` file, not from the folder name: two starts in
    the same second get `offline-run-<time>-<id>-1`."""
    found = []
    for path in sorted(Path(folder).rglob("offline-run-*")):
        logs = sorted(path.glob("run-*.wandb"))
        if path.parent.name == "wandb" and logs:
            found.append(
                OfflineRun(path=path, run_id=logs[0].name[len("run-") : -len(".wandb")], synced=_synced(path))
            )
    return found


def wandb_logged_in() -> bool:
    """Whether W&B credentials for the configured server are at hand (WANDB_API_KEY, ~/.netrc, wandb's
    settings), without asking the server: `wandb sync` would otherwise prompt, or say "Not
    authenticated." and exit 0 having uploaded nothing."""
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    host = wandb_setup.singleton().settings.base_url
    auth = wbauth.authenticate_session(host=host, source="ablate sync", prompt=False, update_session=False)
    return auth is not None


def format_runs(runs: list[OfflineRun], folder: Path) -> str:
    todo = sum(not r.synced for r in runs)
    lines = [f"{len(runs)} offline wandb run(s) under {folder}: {todo} to sync, {len(runs) - todo} synced"]
    lines += [f"  {'synced ' if r.synced else 'to sync'}  {r.run_id}  {r.path}" for r in runs]
    return "\n".join(lines)


def upload(runs: list[OfflineRun]) -> int:
    """`wandb sync` the runs not yet synced (one call; wandb prints its progress); returns the number of
    runs that are still not synced afterwards. Raises ValueError when not logged in to W&B."""
    todo = [r.path for r in runs if not r.synced]
    if not todo:
        return 0
    if not wandb_logged_in():
        raise ValueError(
            "not logged in to W&B: run `wandb login` (or set WANDB_API_KEY) on a host that reaches the "
            "W&B server, then sync again"
        )
    subprocess.run([sys.executable, "-m", "wandb", "sync", *map(str, todo)], check=False)
    return sum(not _synced(path) for path in todo)
