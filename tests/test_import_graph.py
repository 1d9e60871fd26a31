"""The layers import one way (docs: DESIGN.md): core <- sweepstate <- launchers, and analysis reads the
sweep state without the launchers. Checked twice: statically over every import statement (also those
inside functions, which a runtime check only sees when the function runs), and at runtime by importing
each reading package in a fresh interpreter and looking at what got loaded."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> top-level modules it must never import (directly or inside a function)
FORBIDDEN = {
    "core": {"launchers", "analysis", "sweepstate", "optuna", "submitit"},
    "sweepstate": {"launchers", "analysis", "submitit"},
    "analysis": {"launchers", "submitit"},
}


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module an `import` or `from ... import` in `path` (a module of `package`) names,
    relative imports resolved."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join([*base, node.module or ""]).rstrip("."))
            else:
                names.add(node.module)
    return names


def test_imported_modules_sees_function_level_and_relative_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nfrom . import spec\n\ndef f():\n    from launchers.sweeps import slurm\n")
    assert imported_modules(probe, "sweepstate") == {"os", "sweepstate", "launchers.sweeps"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_a_layer_above_it(package):
    offences = []
    for path in sorted((ROOT / package).rglob("*.py")):
        sub = ".".join(path.relative_to(ROOT).parts[:-1])
        for name in imported_modules(path, sub):
            if name.split(".")[0] in FORBIDDEN[package]:
                offences.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offences, "\n".join(offences)


def test_sweepstate_knows_no_slurm():
    """SLURM job accounting reaches the queue as an injected callable; the queue never calls sacct."""
    for path in sorted((ROOT / "sweepstate").rglob("*.py")):
        text = path.read_text()
        assert "sacct" not in text and "squeue" not in text, path


@pytest.mark.parametrize("package", ["analysis", "sweepstate"])
def test_importing_a_reader_loads_no_launcher(package):
    modules = sorted(f"{package}.{p.stem}" for p in (ROOT / package).glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'launchers', 'submitit'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
