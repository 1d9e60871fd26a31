"""`ablate rerun`: run a recorded run again - same code, config and seed - into a new run dir.

The code is the run's snapshot when it ran from one (a sweep trial), else its commit with its saved
diff applied, rebuilt in a temporary folder. The rerun is `ablate run` of the recorded experiment and
overrides, in a fresh Python that imports from that code; the recorded config.yaml is put in the new
run dir first, so that `ablate run` refuses to start if the code composes a different config.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from core.provenance import DIFF_FILE, PROVENANCE_FILE, code_hash, code_root, package_mismatch
from launchers.snapshot import materialise, snapshot_env


def run_dir_of(target: str, root: Path) -> Path:
    """A run dir, or `SWEEP:TRIAL_KEY` -> that trial's run dir under `root`; ValueError if none."""
    path = Path(target)
    if not (path / "config.yaml").exists() and ":" in target:
        sweep, key = target.split(":", 1)
        path = root / "sweeps" / sweep / "trials" / key
    if not (path / PROVENANCE_FILE).exists():
        raise ValueError(f"{target}: not a run directory with a provenance record ({path / PROVENANCE_FILE})")
    return path.resolve()


def rerun(run_dir: Path, new_dir: Path) -> int:
    """Rerun the run in `run_dir` into `new_dir`; returns `ablate run`'s exit code."""
    record = json.loads((run_dir / PROVENANCE_FILE).read_text())
    for line in package_mismatch(record["packages"]):
        print(f"ablate rerun: package version differs: {line}", file=sys.stderr)
    if earlier := record.get("earlier_code"):
        print(
            f"ablate rerun: warning: the run's first epochs ran other code "
            f"({', '.join(e['code_hash'] for e in earlier)}) before it resumed with {record['code_hash']}; "
            "the rerun runs all of it with the latter",
            file=sys.stderr,
        )
    snapshot = Path(record["snapshot"]) if record.get("snapshot") else None
    with tempfile.TemporaryDirectory(prefix="ablate-rerun-") as tmp:
        if snapshot is not None and snapshot.is_dir():
            code = snapshot
        else:
            if not record.get("git_commit"):
                raise ValueError(f"{run_dir}: no snapshot and no git commit recorded: its code is unknown")
            repo = Path(record.get("repo") or code_root())
            repo = repo if repo.is_dir() else code_root()
            diff = (run_dir / DIFF_FILE).read_text() if (run_dir / DIFF_FILE).exists() else ""
            code = materialise(repo, record["git_commit"], diff, Path(tmp) / "code")
        if code_hash(code) != record["code_hash"]:
            print(
                f"ablate rerun: warning: the rebuilt code hashes to {code_hash(code)}, the run's was "
                f"{record['code_hash']} (files the diff did not hold?)",
                file=sys.stderr,
            )
        new_dir.mkdir(parents=True)
        shutil.copy2(run_dir / "config.yaml", new_dir / "config.yaml")
        print(f"rerunning {run_dir} with the code in {code}", file=sys.stderr)
        command = [sys.executable, "-m", "launchers.cli", "run", record["experiment"], *record["overrides"]]
        return subprocess.run(
            [*command, "--run-dir", str(new_dir.resolve())], cwd=code, env=snapshot_env(code)
        ).returncode
