"""Frozen code for sweeps and reruns: a sweep's workers import the code it was submitted with.

`take_snapshot` copies the project's packages and experiment configs (`CODE_PATHS`) of the running
checkout to `<sweep dir>/code/<content hash>/` with the checkout's commit and uncommitted diff; an
unchanged tree maps to the same hash and is not copied again. `code.json` in the sweep dir names
the snapshot new workers run (`current`). A worker started with `snapshot_env` imports from the
snapshot and composes configs from its `experiments/`, never from the live tree, so a trial that is
retried or resumed days later runs the same code. `materialise` rebuilds the code of a run recorded
outside a snapshot from its commit and saved diff (for `ablate rerun`).
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from core.atomic import atomic_write_json, atomic_write_text, file_lock
from core.provenance import (
    CODE_PATHS,
    DIFF_FILE,
    SNAPSHOT_RECORD,
    code_files,
    code_hash,
    code_root,
    code_state,
)
from sweepstate.spec import SweepError
from sweepstate.study import SweepStudy

CODE_ATTR = "ablate:code"  # study user attr: hash of the snapshot new workers run
TRIAL_CODE_ATTR = "code"  # trial user attr: hash of the code the trial ran
CODE_INDEX = "code.json"  # in a sweep dir: {"current": hash, "snapshots": {hash: record}}


@dataclass(frozen=True)
class Snapshot:
    hash: str
    path: Path
    dirty: bool
    created: bool  # False: an identical tree was already there


def take_snapshot(dest: Path, source: Path | None = None) -> Snapshot:
    """Copy the code at `source` (default: the running checkout) to `dest/<hash>/` unless it is there.

    The copy is built in a temporary folder and renamed into place, so a concurrent or killed
    snapshot never leaves a half-copied tree under a hash."""
    source = (source or code_root()).resolve()
    dest = Path(dest).resolve()
    digest = code_hash(source)
    target = dest / digest
    state = code_state(source)
    if (target / SNAPSHOT_RECORD).exists():
        return Snapshot(digest, target, bool(state["git_dirty"]), created=False)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=dest))
    for rel in code_files(source):
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, tmp / rel)
    diff = state.pop("diff")
    state.pop("snapshot", None)
    atomic_write_text(tmp / DIFF_FILE, diff)
    atomic_write_json(tmp / SNAPSHOT_RECORD, {**state, "code_hash": digest, "taken": time.time()})
    try:
        os.rename(tmp, target)
    except OSError:  # another process put the same tree there first
        shutil.rmtree(tmp)
    return Snapshot(digest, target, bool(state["git_dirty"]), created=True)


def record_sweep_code(sweep_dir: Path, snap: Snapshot) -> None:
    """Make `snap` the code that new workers of the sweep run (and remember every one it ran); under
    a lock, so that two `ablate resume --code current` at once both keep their snapshot's record."""
    record = json.loads((snap.path / SNAPSHOT_RECORD).read_text())
    with file_lock(Path(sweep_dir) / f"{CODE_INDEX}.lock"):
        index = read_code_index(sweep_dir)
        index["snapshots"][snap.hash] = {k: record.get(k) for k in ("git_commit", "git_dirty", "taken")}
        index["current"] = snap.hash
        atomic_write_json(Path(sweep_dir) / CODE_INDEX, index)


def read_code_index(sweep_dir: Path) -> dict:
    path = Path(sweep_dir) / CODE_INDEX
    return json.loads(path.read_text()) if path.exists() else {"current": None, "snapshots": {}}


def sweep_code(sweep_dir: Path) -> Path | None:
    """The snapshot new workers of the sweep import from; None for a sweep created before snapshots."""
    current = read_code_index(sweep_dir)["current"]
    return Path(sweep_dir).resolve() / "code" / current if current else None


def snapshot_env(code: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) for a Python that imports the project from `code`: first on
    PYTHONPATH, and no ABLATE_CONFIG_DIR pointing configs elsewhere."""
    env = dict(os.environ if env is None else env)
    env.pop("ABLATE_CONFIG_DIR", None)
    env["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [env.get("PYTHONPATH")])])
    return env


def running_code() -> str:
    """The content hash of the code this process runs (read from its snapshot when it is one)."""
    record = code_root() / SNAPSHOT_RECORD
    return json.loads(record.read_text())["code_hash"] if record.exists() else code_hash(code_root())


def materialise(repo: Path, commit: str, diff: str, into: Path) -> Path:
    """The code of `commit` of the git checkout `repo` with `diff` applied, written to `into` (only
    `CODE_PATHS`); raises ValueError naming what is missing when it cannot be rebuilt."""
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", commit, "--", *CODE_PATHS],
        capture_output=True,
    )
    if archive.returncode != 0:
        raise ValueError(f"cannot read commit {commit} from {repo}: {archive.stderr.decode().strip()}")
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    if diff:
        patch = into / DIFF_FILE
        patch.write_text(diff)
        includes = [f"--include={p}/*" for p in CODE_PATHS]
        applied = subprocess.run(
            ["git", "apply", "--binary", *includes, DIFF_FILE], cwd=into, capture_output=True, text=True
        )
        if applied.returncode != 0:
            raise ValueError(f"the saved diff does not apply to {commit}: {applied.stderr.strip()}")
    atomic_write_json(
        into / SNAPSHOT_RECORD,
        {"git_commit": commit, "git_dirty": bool(diff), "repo": str(repo), "code_hash": code_hash(into)},
    )
    return into


def snapshot_setup(code: Path) -> list[str]:
    """Shell lines that make a submitit job (local or SLURM `setup`) import from the snapshot `code`:
    `python -m` puts the working directory first on sys.path, so the job starts inside it."""
    quoted = shlex.quote(str(code))
    return [
        f"cd {quoted}",
        f'export PYTHONPATH={quoted}"${{PYTHONPATH:+:$PYTHONPATH}}"',
        "unset ABLATE_CONFIG_DIR",
    ]


def freeze_sweep(sweep_dir: Path, sweep_file: Path | None) -> Snapshot:
    """Snapshot the running checkout for the sweep in `sweep_dir` and make it the code its workers run;
    the sweep file is kept next to it."""
    snap = take_snapshot(Path(sweep_dir) / "code")
    if sweep_file is not None and Path(sweep_file).is_file():
        shutil.copy2(sweep_file, snap.path / "sweep.yaml")
    record_sweep_code(sweep_dir, snap)
    return snap


def require_clean(source: Path | None = None) -> None:
    """SweepError when the checkout has uncommitted changes to its code (`--require-clean`)."""
    state = code_state(source)
    if state["git_dirty"]:
        files = sorted({line[6:] for line in state["diff"].splitlines() if line.startswith("+++ b/")})
        raise SweepError(f"--require-clean: the checkout has uncommitted changes: {', '.join(files)}")


def use_code(study: SweepStudy, sweep_file: Path | None, replace: bool) -> Snapshot | None:
    """Give a sweep its code: a snapshot of the running checkout when it has none yet or when
    `replace` (`ablate resume --code current`); otherwise it keeps the one it has (None)."""
    if not replace and sweep_code(study.sweep_dir) is not None:
        return None
    snap = freeze_sweep(study.sweep_dir, sweep_file)
    study.storage.set_study_user_attr(study.study_id, CODE_ATTR, snap.hash)
    print(f"code: {snap.path}" + ("" if snap.created else " (unchanged, already there)"), file=sys.stderr)
    if snap.dirty:
        print(
            "ablate: the checkout has uncommitted changes; the sweep runs them "
            f"(diff: {snap.path / DIFF_FILE})",
            file=sys.stderr,
        )
    return snap
