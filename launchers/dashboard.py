"""`ablate dashboard SWEEP`: optuna-dashboard (history, intermediate values, parallel coordinates,
importances, the trial table) live on the sweep's own storage - its journal file, SQLite database or
PostgreSQL - without copying anything.

The server binds to 127.0.0.1 unless told otherwise: on a cluster's login node a port open to the
network would show the study to everyone there, so the printed ssh line forwards it to a laptop
instead. It is read-only (the dashboard can otherwise tell, rename and delete trials and studies, and
the sweep's queue lives in that study) and never serves the storage's password: a study user attr
holds the sweep spec, storage URL included, so every response has it masked.
"""

from __future__ import annotations

import getpass
import json
import signal
import socket
import sys
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import unquote, urlsplit
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from sweepstate.study import SweepStudy, mask_secrets

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
MISSING = (
    "ablate dashboard needs optuna-dashboard (>= 0.21), an optional extra: pip install 'ablate[dashboard]' "
    "(or pip install 'optuna-dashboard>=0.21')"
)
Wsgi = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class DashboardError(ValueError):
    """The dashboard cannot start (missing extra, port taken): message for the user, exit 2."""


def storage_secrets(url: str | None) -> list[str]:
    """The strings a response must not contain: the password of an RDB URL, as written and decoded,
    and as JSON escapes them."""
    if not url or "://" not in url:
        return []
    password = urlsplit(url).password
    if not password:
        return []
    forms = {password, unquote(password)}
    forms |= {json.dumps(f)[1:-1] for f in forms}
    return sorted(forms, key=len, reverse=True)


def masking(app: Wsgi, secrets: list[str]) -> Wsgi:
    """`app` with every secret in its response bodies replaced by *** (and Content-Length fixed)."""
    if not secrets:
        return app

    def masked(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        captured: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable:
            captured.update(status=status, headers=headers, exc_info=exc_info)
            return lambda data: None  # the legacy write() callable: bottle does not use it

        chunks = app(environ, capture)
        try:
            body = b"".join(chunks)
        finally:
            close = getattr(chunks, "close", None)  # PEP 3333: a middleware that consumes it closes it
            if close is not None:
                close()
        for secret in secrets:
            body = body.replace(secret.encode(), b"***")
        headers = [(k, v) for k, v in captured["headers"] if k.lower() != "content-length"]
        start_response(
            captured["status"], [*headers, ("Content-Length", str(len(body)))], captured["exc_info"]
        )
        return [body]

    return masked


def read_only(app: Wsgi) -> Wsgi:
    """`app` answering 405 to anything but GET and HEAD."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD", "GET") in ("GET", "HEAD"):
            return app(environ, start_response)
        body = b"ablate dashboard is read-only: the sweep's queue lives in this study"
        start_response("405 Method Not Allowed", [("Content-Type", "text/plain"), ("Allow", "GET, HEAD")])
        return [body]

    return guarded


def dashboard_app(study: SweepStudy) -> Wsgi:
    """optuna-dashboard's WSGI app on the sweep's open storage, read-only, its password masked."""
    try:
        from optuna_dashboard import wsgi
    except ImportError as exc:
        raise DashboardError(MISSING) from exc
    return read_only(masking(wsgi(study.storage), storage_secrets(study.spec.storage)))


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a browser's open polling connection does not keep the process alive


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # one line per poll would drown the URL
        pass


def tunnel_line(host: str, port: int) -> str:
    """The ssh command that forwards `port` of this machine to the same port of a laptop."""
    target = "localhost" if host in ("127.0.0.1", "localhost", "::1", "0.0.0.0") else host
    return f"ssh -N -L {port}:{target}:{port} {getpass.getuser()}@{socket.gethostname()}"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def serve(study: SweepStudy, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Serve the dashboard until Ctrl-C or SIGTERM (kill, scancel; from the main thread); prints the
    study's URL and the ssh tunnel line first (port 0: any free port, the one taken is printed)."""
    app = dashboard_app(study)
    try:
        server = make_server(host, port, app, server_class=_Server, handler_class=_QuietHandler)
    except OSError as exc:
        raise DashboardError(
            f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port"
        ) from exc
    port = server.server_port
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0") else host
    path = f"/dashboard/studies/{study.study_id}"
    where = mask_secrets(study.spec.storage) if study.spec.storage else "journal file"
    print(f"dashboard of sweep {study.spec.name} ({where}, read-only): http://{shown}:{port}{path}")
    print(f"from a laptop: {tunnel_line(host, port)}  then open http://localhost:{port}{path}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: bound to {host}: anyone who can reach this port sees the study", file=sys.stderr)
    sys.stdout.flush()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        signal.signal(signal.SIGTERM, previous)
