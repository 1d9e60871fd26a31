"""`from_wandb` against recorded wandb API responses: the real wandb client (and its wandb-core service)
talks to a local HTTP server that replays the GraphQL responses in tests/data/wandb_api/ (a sweep of three
trials: one complete, one pruned, one crashed; two pages of runs, a history of two pages). The frames it
gives must equal what `load_runs` / `load_history` read from the same three trials kept on disk."""

import json
import math
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from analysis.records import load_history, load_runs
from analysis.wandb_export import WANDB_REASONS, from_wandb
from sweepstate.spec import GRID_PRUNER, GRID_SAMPLER, SweepSpec
from sweepstate.study import SweepStudy

DATA = Path(__file__).parent / "data" / "wandb_api"
PATH, SWEEP = "lab/ablate", "wbx"
FILTERS = {"$and": [{"group": SWEEP}, {"config.experiment_name": "progress_learnable"}]}
COMMIT = "0123456789abcdef0123456789abcdef01234567"
KEYS = (
    "train/total_loss",
    "val/total_loss",
    "val/alignment_loss",
    "val/ogpe",
    "val/ogpe_action",
    "lr",
    "epoch_time_s",
)
# the three trials as they ran: wandb id, lambda, per-epoch metrics (KEYS), best checkpoints, test metrics
TRIALS = {
    "a": dict(
        wandb_id="5f1c2a9e0b7d4c31",
        lam=0.1,
        status="completed",
        wall=12.0,
        rows=[
            (2.0, 1.9, 1.5, 0.3, 0.4, 0.001, 0.75),
            (1.5, 1.4, 1.1, 0.25, 0.33, 0.001, 0.5),
            (1.25, 1.2, 1.2, 0.2, 0.3125, 0.001, 0.5),
        ],
        best={"alignment": (1.1, 1), "combined": (1.2, 2)},
        test={"test/ogpe": 0.22, "test/ogpe_action": 0.33},
    ),
    "b": dict(
        wandb_id="8a2e6b0c4d9f1e72",
        lam=0.3,
        status="pruned",
        wall=8.0,
        rows=[(2.5, 2.25, 1.75, 0.375, 0.5, 0.001, 0.625), (2.0, 2.125, 1.5, 0.35, 0.45, 0.001, 0.5)],
        best={"alignment": (1.5, 1), "combined": (2.125, 1)},
        test={"test/ogpe": 0.37, "test/ogpe_action": 0.47},
    ),
    "c": dict(  # its worker died after one epoch: summary.json still says running, wandb says crashed
        wandb_id="c3d4e5f60718293a",
        lam=1.0,
        status="running",
        wall=None,
        rows=[(3.0, 2.75, 2.0, 0.5, 0.6, 0.001, 0.875)],
    ),
}
OPTUNA_ONLY = ["number", "attempt", "value"]


# ------------------------------------------------------------------------------- the replayed server
class Replay:
    """GraphQL exchanges recorded as {"request": {"operation", "variables"}, "response"}; a request is
    answered by the exchange of its operation whose recorded variables it carries."""

    def __init__(self, exchanges: list[dict]) -> None:
        self.exchanges = exchanges
        self.requests: list[tuple[str, dict]] = []
        self.unmatched: list[tuple[str, dict]] = []

    def answer(self, body: dict) -> dict | None:
        match = re.search(r"query\s+(\w+)", body.get("query", ""))
        operation, variables = (match[1] if match else ""), body.get("variables") or {}
        self.requests.append((operation, variables))
        for e in self.exchanges:
            want = e["request"]
            if want["operation"] == operation and all(
                variables.get(k) == v for k, v in want["variables"].items()
            ):
                return e["response"]
        self.unmatched.append((operation, variables))
        return None

    def calls(self, operation: str) -> list[dict]:
        return [v for op, v in self.requests if op == operation]


def handler(replay: Replay) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path != "/graphql":  # wandb-core's own telemetry
                self.send_response(200)
                self.end_headers()
                return
            response = replay.answer(json.loads(body))
            data = json.dumps(response or {"errors": [{"message": "no recorded response"}]}).encode()
            self.send_response(200 if response else 400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    return Handler


@pytest.fixture
def server(monkeypatch, tmp_path):
    replay = Replay([e for f in sorted(DATA.glob("*.json")) for e in json.loads(f.read_text())])
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler(replay))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{httpd.server_port}")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    yield replay
    httpd.shutdown()
    httpd.server_close()


# ------------------------------------------------------------------- the same trials kept on disk
def config(lam: float) -> dict:
    return {
        "family": "progress",
        "experiment_name": "progress_learnable",
        "seed": 0,
        "loss": {"progress": {"method": "learnable", "lambda": lam, "k": 1}},
        "trainer": {"device": "cpu", "epochs": 3, "lr": 0.001},
        "logger": {"enabled": True, "project": "ablate", "tags": ["debug"]},
        "data": {"split_fractions": [0.6, 0.2, 0.2]},
    }


def write_trial(run_dir: Path, t: dict) -> None:
    """config.yaml, metrics.jsonl and summary.json as core/train/run.py writes them (sorted JSON keys)."""
    run_dir.mkdir(parents=True)
    history = [{"epoch": float(e), **dict(zip(KEYS, r, strict=True))} for e, r in enumerate(t["rows"])]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config(t["lam"]), sort_keys=False))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in history))
    summary = {
        "experiment": "progress_learnable",
        "family": "progress",
        "status": t["status"],
        "environment": {"git_commit": COMMIT, "packages": {"torch": "2.13.0+cpu"}},
    }
    if t["status"] != "running":
        last = history[-1]
        summary.update(
            epochs_run=len(history),
            final=last,
            best={name: {"value": v, "epoch": e} for name, (v, e) in t["best"].items()},
            eval={
                "checkpoint": "combined",
                "val/ogpe": last["val/ogpe"],
                "val/ogpe_action": last["val/ogpe_action"],
                **t["test"],
            },
            wall_time_s=t["wall"],
        )
    (run_dir / "summary.json").write_text(json.dumps(summary, sort_keys=True))


@pytest.fixture
def local_sweep(tmp_path) -> SweepStudy:
    """The sweep of TRIALS run through the real study: a complete, b pruned, c lost (its lease expired)."""
    axis = (("method", tuple((m, (f"loss.progress.lambda={t['lam']}",)) for m, t in TRIALS.items())),)
    spec = SweepSpec(
        name=SWEEP,
        path=f"{SWEEP}.yaml",
        experiment="progress_learnable",
        overrides=("debug=fast",),
        metric="val/ogpe_action",
        direction="minimize",
        seeds=(0,),
        mode="grid",
        n_trials=None,
        params=(),
        sampler=GRID_SAMPLER,
        pruner=GRID_PRUNER,
        grid=axis,
        storage=None,
        workers=1,
        heartbeat_s=1.0,
        timeout_s=30.0,
        max_retries=0,
        launcher={"name": "local"},
    )
    study = SweepStudy.create(spec, tmp_path / "runs")
    for _ in TRIALS:
        claim = study.claim("w0")
        t = TRIALS[claim.params["method"]]
        write_trial(claim.run_dir, t)
        if t["status"] == "completed":
            study.finish(claim, TrialState.COMPLETE, t["rows"][-1][KEYS.index("val/ogpe_action")])
        elif t["status"] == "pruned":
            study.finish(claim, TrialState.PRUNED)
    assert len(study.recover_stale(now=time.time() + 3600)) == 1  # c: failed, no retry left
    return study


def wandb_url(replay_url: str, method: str) -> str:
    return f"{replay_url}/lab/ablate/runs/{TRIALS[method]['wandb_id']}"


# -------------------------------------------------------------------------------------------- tests
def test_from_wandb_equals_load_runs_of_the_same_trials(server, local_sweep):
    runs, history = from_wandb(PATH, FILTERS, per_page=2, page_size=2)
    assert not server.unmatched
    local = load_runs(local_sweep.sweep_dir)
    expected = local.drop(columns=OPTUNA_ONLY)
    assert sorted(runs.columns) == sorted(expected.columns)
    assert runs["method"].tolist() == ["a", "b", "c"] == expected["method"].tolist()
    urls = {m: wandb_url(os.environ["WANDB_BASE_URL"], m) for m in TRIALS}
    assert runs["run_dir"].tolist() == list(urls.values())
    assert runs["state"].tolist() == ["complete", "pruned", "failed"]
    # wandb knows a crash from its heartbeats, not the worker's lease; its runtime, not the summary's
    crashed = runs.iloc[2]
    assert crashed["reason"] == WANDB_REASONS["crashed"] and expected.iloc[2]["reason"].startswith(
        "worker lost"
    )
    assert pd.isna(crashed["status"]) and crashed["wall_time_s"] == 3.0 and crashed["gpu_hours"] == 0.0
    differ = ["reason", "status", "wall_time_s", "gpu_hours"]
    expected.loc[2, differ] = crashed[differ].to_numpy()
    expected["run_dir"] = list(urls.values())
    pd.testing.assert_frame_equal(runs[expected.columns], expected, check_dtype=False)
    # values worth naming: best epochs recomputed from the history, eval vs last-epoch val metrics
    a = runs.iloc[0]
    assert (a["best_epoch/alignment"], a["best_epoch/combined"], a["epochs_run"]) == (1, 2, 3)
    assert a["final/val/ogpe_action"] == 0.3125 and a["test/ogpe_action"] == 0.33
    assert "val/total_loss" not in runs.columns and a["gpus"] == 0.0 and a["key"] == local.iloc[0]["key"]

    local_history = load_history(runs=local).replace(
        {"run_dir": dict(zip(local["run_dir"], urls.values(), strict=True))}
    )
    order = ["run_dir", "epoch", "metric"]
    pd.testing.assert_frame_equal(
        history.sort_values(order).reset_index(drop=True),
        local_history.sort_values(order).reset_index(drop=True),
    )


def test_from_wandb_pages_runs_and_history_and_passes_the_filters(server):
    from_wandb(PATH, FILTERS, per_page=2, page_size=2)
    pages = server.calls("Runs")
    assert [p["cursor"] for p in pages] == [None, "cursor-2"]
    assert all(p["perPage"] == 2 and json.loads(p["filters"]) == FILTERS for p in pages)
    a_pages = [
        (v["minStep"], v["maxStep"]) for v in server.calls("HistoryPage") if v["run"] == "5f1c2a9e0b7d4c31"
    ]
    assert a_pages == [(0, 2), (2, 3)]
    assert len(server.calls("HistoryPage")) == 4  # a: 2 pages, b and c: 1 each


def test_from_wandb_without_history_reads_only_the_run_pages(server):
    runs, history = from_wandb(PATH, FILTERS, history=False, per_page=2)
    assert not server.calls("HistoryPage") and not server.unmatched
    assert history.empty and list(history.columns) == ["run_dir", "epoch", "metric", "value"]
    assert not [c for c in runs.columns if c.startswith("final/")]
    a = runs.iloc[0]
    assert a["epochs_run"] == 3 and a["best/combined"] == 1.2 and math.isnan(a["best_epoch/combined"])
    assert a["test/ogpe_action"] == 0.33 and a["state"] == "complete"


class _Run:
    """A run as the wandb client hands it out, for states the recording does not hold."""

    def __init__(self, state: str, summary: dict) -> None:
        self.state, self.summary_metrics, self.config = state, summary, config(0.1)
        self.name, self.group, self.tags, self.commit, self.url = "progress_learnable/r1", "g", [], None, "u"


@pytest.mark.parametrize(
    ("wandb_state", "summary", "state"),
    [
        ("finished", {"status": "pruned"}, "pruned"),
        ("failed", {}, "failed"),
        ("killed", {}, "failed"),
        ("running", {}, "running"),
        ("pending", {}, "waiting"),
        ("preempted", {}, "waiting"),
    ],
)
def test_wandb_states_map_onto_the_table_states(wandb_state, summary, state):
    from analysis.wandb_export import run_row

    row = run_row(_Run(wandb_state, summary), [])
    assert row["state"] == state and row["sweep"] is None and row["seed"] == 0
    assert row["reason"] == WANDB_REASONS.get(wandb_state)
