"""Where a run's numbers came from: the code (content hash, commit, uncommitted diff), the Python and
package versions, the host and GPU, and the exact command - enough for `ablate rerun` to rebuild it.

The code is identified by a content hash of the project's packages and experiment configs
(`code_hash`), the same hash that names a sweep's code snapshot. Code that runs from a snapshot
(`runs/sweeps/<name>/code/<hash>/`, no git there) reads its commit and diff from the snapshot's
`snapshot.json` and `diff.patch`, written when the snapshot was taken from the checkout.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

# What a run's code is: the importable packages and the Hydra config root. Tests, docs and benchmarks
# do not change what a run computes.
CODE_PATHS = ("core", "launchers", "analysis", "sweepstate", "experiments")
SNAPSHOT_RECORD = "snapshot.json"  # in a snapshot's root: the checkout's commit it was taken from
DIFF_FILE = "diff.patch"
PROVENANCE_FILE = "provenance.json"  # in a run dir, next to its diff.patch


def code_root() -> Path:
    """The tree this process's code was imported from: the checkout, or a sweep's snapshot."""
    return Path(__file__).resolve().parents[1]


def code_files(root: Path) -> list[Path]:
    """The files of `CODE_PATHS` under `root`, relative, sorted (caches and bytecode left out)."""
    files = []
    for top in CODE_PATHS:
        for dirpath, dirnames, filenames in os.walk(root / top):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            files += [
                (Path(dirpath) / f).relative_to(root) for f in filenames if not f.endswith((".pyc", ".pyo"))
            ]
    return sorted(files)


def code_hash(root: Path) -> str:
    """Content hash of the code under `root` (paths and bytes): equal trees, equal hashes."""
    h = hashlib.sha256()
    for rel in code_files(root):
        data = (root / rel).read_bytes()
        h.update(f"{rel.as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]


def _git(repo: Path, *args: str, env: dict[str, str] | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30, env=env
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state(repo: Path) -> dict[str, Any]:
    """Commit of the checkout at `repo` and its uncommitted diff against it, as one patch: changes to
    tracked files plus the untracked files of `CODE_PATHS` (a new module is part of the code). The
    diff is built in a throwaway index, so the checkout's own index is left alone. Empty outside git."""
    commit = _git(repo, "rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": None, "git_dirty": None, "diff": ""}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
        _git(repo, "read-tree", "HEAD", env=env)
        _git(repo, "add", "-u", env=env)
        _git(repo, "add", "-A", "--", *[p for p in CODE_PATHS if (repo / p).exists()], env=env)
        diff = _git(repo, "diff", "--cached", "--binary", "HEAD", env=env) or ""
    return {"git_commit": commit.strip(), "git_dirty": bool(diff), "diff": diff}


def code_state(root: Path | None = None) -> dict[str, Any]:
    """Commit, dirty flag and diff of the code at `root` (default: the running code), whether it is a
    checkout or a snapshot taken from one."""
    root = root or code_root()
    record = root / SNAPSHOT_RECORD
    if record.exists():
        saved = json.loads(record.read_text())
        diff = (root / DIFF_FILE).read_text() if (root / DIFF_FILE).exists() else ""
        return {**saved, "diff": diff, "snapshot": str(root)}
    return {**git_state(root), "repo": str(root), "snapshot": None}


def distributions() -> dict[str, str]:
    """Every installed distribution and its version (importlib.metadata: a few ms)."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[name.lower()] = dist.version
    return dict(sorted(found.items()))


def gpu() -> dict[str, Any] | None:
    """Model, count and driver of the visible GPUs; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    driver = None
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        driver = out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout else None
    return {
        "model": torch.cuda.get_device_name(0),
        "count": torch.cuda.device_count(),
        "cuda": torch.version.cuda,
        "driver": driver,
    }


def provenance(experiment: str, overrides: list[str]) -> tuple[dict[str, Any], str]:
    """(the record of this process's code, environment and command; the uncommitted diff)."""
    root = code_root()
    state = code_state(root)
    diff = state.pop("diff")
    record = {
        "code_hash": code_hash(root),
        **state,
        "experiment": experiment,
        "overrides": list(overrides),
        "command": [sys.executable, *sys.argv],
        "cwd": os.getcwd(),
        "python": platform.python_version(),
        "host": platform.node(),
        "platform": platform.platform(),
        "gpu": gpu(),
        "packages": distributions(),
    }
    return record, diff


def package_mismatch(recorded: dict[str, str], installed: dict[str, str] | None = None) -> list[str]:
    """Lines naming each distribution whose installed version differs from the recorded one."""
    installed = distributions() if installed is None else installed
    lines = []
    for name in sorted(recorded.keys() | installed.keys()):
        was, now = recorded.get(name), installed.get(name)
        if was != now:
            lines.append(f"{name}: recorded {was or 'not installed'}, installed {now or 'not installed'}")
    return lines


def run_code(run_dir: Path | None) -> str | None:
    """The code hash a run (last) ran with, from its provenance.json; None when it has none yet."""
    path = Path(run_dir) / PROVENANCE_FILE if run_dir is not None else None
    return json.loads(path.read_text())["code_hash"] if path is not None and path.exists() else None
