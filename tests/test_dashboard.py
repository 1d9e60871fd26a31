"""`ablate dashboard`: the real optuna-dashboard served on a sweep's journal storage by the CLI, read
through its HTTP API and rendered by headless chromium; read-only, the storage password masked, a
clear message without the extra. The sweep is the demo's grid shape, driven through the study API."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from optuna.trial import TrialState

from launchers.dashboard import MISSING, masking, read_only, storage_secrets, tunnel_line
from sweepstate.study import SweepStudy
from tests.browser import dump_dom
from tests.test_analysis import FAILED, build_grid_sweep

STARTUP_S = 180  # importing optuna, optuna-dashboard and the sweep layer on a loaded 2-core machine


def start_dashboard(root: Path, sweep: str) -> tuple[subprocess.Popen, str, Path]:
    """`ablate dashboard SWEEP --port 0` in its own process, started as a background job of a
    non-interactive shell starts it (SIGINT ignored: CI runners do that); (process, the line with its
    URL, its stderr file). Its stderr goes to a file: a pipe nobody reads could fill and block it."""
    errors = root / f"{sweep}.stderr"
    with errors.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "launchers.cli", "dashboard", sweep, "--root", str(root), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
    line = proc.stdout.readline()  # blocks until the server listens (or the process dies)
    assert "http://localhost:" in line, f"no URL in {line!r}; stderr: {errors.read_text()[-3000:]}"
    return proc, line, errors


def stop_dashboard(proc: subprocess.Popen, sig: signal.Signals, errors: Path) -> None:
    """Stop it with `sig`: it must exit 0 within 30 s (else faulthandler's dump of its threads, which
    SIGABRT makes it write, says where it hung)."""
    os.kill(proc.pid, sig)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        proc.wait()
        pytest.fail(f"the dashboard did not stop on {sig.name} within 30 s:\n{errors.read_text()[-8000:]}")
    assert code == 0, errors.read_text()[-3000:]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The demo sweep's dashboard; yields (base url, study path, study, what it printed), then stops
    it with Ctrl-C (SIGINT), by PID."""
    root = tmp_path_factory.mktemp("dash")
    study = build_grid_sweep(root, "demo")
    proc, line, errors = start_dashboard(root, "demo")
    try:
        match = re.search(r"(http://localhost:(\d+))(/dashboard/studies/\d+)", line)
        tunnel = proc.stdout.readline()
        yield match.group(1), match.group(3), study, line + tunnel
    finally:
        stop_dashboard(proc, signal.SIGINT, errors)


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def test_dashboard_prints_its_url_on_localhost_and_the_ssh_tunnel(server):
    base, path, _, printed = server
    assert "sweep demo (journal file, read-only)" in printed
    port = base.rsplit(":", 1)[1]
    assert f"ssh -N -L {port}:localhost:{port} " in printed and f"then open {base}{path}" in printed
    assert tunnel_line("10.0.0.5", 8080).startswith("ssh -N -L 8080:10.0.0.5:8080 ")


def test_dashboard_api_serves_the_sweeps_study_and_readable_trials(server):
    base, _, study, _ = server
    summaries = get(base + "/api/studies")["study_summaries"]
    assert [s["study_name"] for s in summaries] == ["demo"]
    detail = get(f"{base}/api/studies/{summaries[0]['study_id']}")
    trials = detail["trials"]
    records = {t.number: t for t in study.trials()}
    assert len(trials) == len(records) == 32
    states = {"Complete": "COMPLETE", "Fail": "FAIL", "Running": "RUNNING", "Waiting": "WAITING"}
    for t in trials:
        record = records[t["number"]]
        assert states[t["state"]] == record.state
        attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
        if record.state == "WAITING":
            continue
        method = record.params["method"]
        assert attrs["label"] == f"method={method}" and attrs["seed"] == str(record.seed)
        assert attrs["run_dir"] == str(record.run_dir)
        if (method, record.seed) in FAILED:
            assert attrs["fail_reason"] == "RuntimeError: boom"
        if record.state == "COMPLETE":
            assert t["values"] == [pytest.approx(record.value)]


def test_dashboard_is_read_only(server):
    base, *_ = server
    request = urllib.request.Request(
        base + "/api/studies/0/rename", data=b'{"study_name": "x"}', method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 405
    assert [s["study_name"] for s in get(base + "/api/studies")["study_summaries"]] == ["demo"]


def test_chromium_shows_the_studys_trials(server, tmp_path):
    base, path, study, _ = server
    dom, errors = dump_dom(f"{base}{path}/trials", tmp_path)
    shown = {int(n) for n in re.findall(r"Trial (\d+)", dom)}
    # the trial list (virtualised: it renders what fits the window) names the study's first trials
    assert len(shown) >= 10 and shown <= {t.number for t in study.trials()} and 0 in shown
    assert "method=none" in dom and "run_dir" in dom  # the first trial's user attributes are readable
    assert errors == []


def test_responses_never_carry_the_storage_password():
    url = "postgresql+psycopg://ablate:s3cr%40t%22x@db.example:5432/optuna"
    secrets = storage_secrets(url)
    assert 's3cr@t"x' in secrets and "s3cr%40t%22x" in secrets and 's3cr@t\\"x' in secrets
    assert storage_secrets("sqlite") == [] and storage_secrets(None) == []

    def app(environ, start_response):
        body = json.dumps({"storage": url.replace("%40", "@").replace("%22", '"'), "raw": url}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    seen = {}
    body = b"".join(
        read_only(masking(app, secrets))({"REQUEST_METHOD": "GET"}, lambda s, h, e=None: seen.update(h=h))
    )
    assert b"s3cr" not in body and body.count(b"***") == 2
    assert dict(seen["h"])["Content-Length"] == str(len(body))


def test_without_the_extra_the_cli_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    from launchers.cli import main

    build_grid_sweep(tmp_path, "demo")
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # import fails as if not installed
    assert main(["dashboard", "demo", "--root", str(tmp_path)]) == 2
    assert MISSING in capsys.readouterr().err and "ablate[dashboard]" in MISSING


def test_sigterm_stops_the_dashboard_cleanly(tmp_path):
    """As `kill`, scancel or a container runtime stop it."""
    build_grid_sweep(tmp_path, "term")
    proc, line, errors = start_dashboard(tmp_path, "term")
    base = re.search(r"http://localhost:\d+", line).group(0)
    assert get(base + "/api/studies")["study_summaries"][0]["study_name"] == "term"
    stop_dashboard(proc, signal.SIGTERM, errors)


def test_a_taken_port_is_a_usage_error(server, capsys):
    from launchers.cli import main

    base, *_ = server
    started = time.time()
    assert (
        main(
            [
                "dashboard",
                "demo",
                "--root",
                str(server[2].sweep_dir.parent.parent),
                "--port",
                base.rsplit(":", 1)[1],
            ]
        )
        == 2
    )
    assert "choose another --port" in capsys.readouterr().err and time.time() - started < 60


def test_dashboard_app_reads_a_sqlite_sweep(tmp_path):
    """The same app on the SQLite storage (BEGIN IMMEDIATE engine), called as WSGI without a server."""
    from wsgiref.util import setup_testing_defaults

    from launchers.dashboard import dashboard_app
    from tests.test_analysis import spec_of

    study = SweepStudy.create(spec_of("lite", seeds=(0, 1), storage="sqlite"), tmp_path)
    claim = study.claim("w1")
    study.finish(claim, TrialState.FAIL, reason="ValueError: bad batch")
    environ = {"PATH_INFO": f"/api/studies/{study.study_id}", "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    status = {}
    body = b"".join(dashboard_app(study)(environ, lambda s, h, e=None: status.update(s=s)))
    assert status["s"].startswith("200")
    trials = json.loads(body)["trials"]
    assert len(trials) == study.spec.budget == 8
    failed = next(t for t in trials if t["state"] == "Fail")
    attrs = {a["key"]: a["value"] for a in failed["user_attrs"]}
    assert attrs["fail_reason"] == "ValueError: bad batch" and attrs["label"] == "method=none"
    assert attrs["run_dir"] == str(claim.run_dir) and attrs["seed"] == "0"
