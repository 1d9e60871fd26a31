"""Debian's headless chromium for the tests that check what a person sees: the page's DOM after its
JavaScript ran, a screenshot, and the browser's console errors. .ci/run installs chromium; elsewhere
without it these tests skip (in CI they fail instead, so a missing browser cannot hide)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

# as root chromium needs --no-sandbox; no GPU, no first-run or extension noise
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions")
TIMEOUT_S = 120


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium(), *FLAGS, "--enable-logging=stderr", "--v=0", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=cwd,
        check=False,
    )


def console_errors(stderr: str) -> list[str]:
    """The page's console messages and failed loads among chromium's own log lines (which also hold
    harmless complaints about the missing D-Bus of a container). Chromium's log does not say a console
    message's level, so every one counts: the pages tested here log nothing when all is well."""
    return [line for line in stderr.splitlines() if re.search(r":CONSOLE[:(]|net::ERR_", line)]


def dump_dom(url: str, tmp: Path, budget_ms: int = 15_000, offline: bool = False) -> tuple[str, list[str]]:
    """The DOM of `url` after `budget_ms` of virtual time (its scripts and polling ran) and the
    console errors. `offline`: every host resolves nowhere (a page that needs the network fails)."""
    args = [f"--virtual-time-budget={budget_ms}", "--dump-dom", url]
    if offline:
        args = ["--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9", *args]
    done = _run(args, tmp)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, console_errors(done.stderr)


def screenshot(url: str, path: Path, size: tuple[int, int] = (1200, 4000), offline: bool = True) -> list[str]:
    """A PNG of `url` at `size` (a tall window: the whole report), the console errors."""
    args = [f"--screenshot={path}", f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=5000", url]
    if offline:
        args = ["--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9", *args]
    done = _run(args, path.parent)
    assert done.returncode == 0 and path.is_file(), done.stderr[-2000:]
    return console_errors(done.stderr)
