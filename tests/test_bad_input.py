"""The bad-input contract of every command: exit 2, the culprit named, no password, nothing written.

One table of inputs a new user gets wrong (issue 18's table, its three weak messages, and more). Each
row runs the CLI in-process and compares the whole tmp tree (results root, sweep files, data) and the
shipped sweeps/ folder before and after: not a file, folder, lock or wandb run may appear or change.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import hypothesis
import pytest
from hypothesis import strategies as st
from omegaconf import DictConfig, ListConfig, OmegaConf

from launchers.cli import main
from launchers.config import compose_experiment, config_groups, flat_keys, group_options
from launchers.sweeps.spec import sweeps_dir

PASSWORD = "s3cretPW"
NO_SERVER = f"postgresql://alice:{PASSWORD}@127.0.0.1:1/db"  # port 1: nothing listens, refused at once
TINY_SWEEP = """
experiment: progress_learnable
overrides: [debug=fast, trainer.epochs=1, logger.enabled=false]
objective: {metric: val/ogpe_action, direction: minimize}
seeds: [0]
grid:
  loss/progress: [none, learnable]
"""


def _features(tmp: Path) -> Path:
    from core.data.synthetic import make_procedure_dataset, write_feature_dataset

    videos = make_procedure_dataset(seed=0, n_tasks=2, videos_per_task=6, d_in=8)
    return write_feature_dataset(videos, tmp / "feats")


def _corrupt_npy(tmp: Path) -> None:
    first = sorted((_features(tmp) / "features").glob("*.npy"))[0]
    first.write_bytes(b"\x80\x04not an array")  # what numpy takes for a pickle


def _run_dir_with_truncated_checkpoint(tmp: Path) -> None:
    from core.train.checkpoint import save_checkpoint

    run = tmp / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = compose_experiment("progress_learnable", ["debug=fast"])
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    path = run / "checkpoints" / "best_model_combined.pt"
    save_checkpoint(path, {"model": {"w": __import__("torch").zeros(256, 256)}, "epoch": 1})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _sweep_file(storage: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / "tiny.yaml").write_text(TINY_SWEEP + f"storage: {storage}\n")

    return setup


def _saved_sweep(storage: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        saved = tmp / "runs" / "sweeps" / "old" / "sweep.json"
        saved.parent.mkdir(parents=True)
        saved.write_text(f'{{"name": "old", "storage": "{storage}"}}')

    return setup


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]  # "{tmp}" stands for the test's tmp_path
    expect: list[str]  # every one of these is in the message
    setup: Callable[[Path], object] = lambda tmp: None
    absent: list[str] = field(default_factory=list)  # none of these is


RUN = ["run", "progress_learnable", "debug=fast"]
CASES = [
    # issue 18's table
    Case("seed-not-an-int", [*RUN, "seed=abc"], ["seed", "integer", "abc"]),
    Case(
        "annotation-fps-without-feature-fps",
        [*RUN, "data=features", "data.root={tmp}/feats", "data.annotation_fps=30"],
        ["data.annotation_fps", "data.feature_fps"],
        _features,
    ),
    Case("run-dir-is-a-file", [*RUN, "--run-dir", "{tmp}/afile"], ["--run-dir", "afile", "not a directory"]),
    Case("root-is-a-file", [*RUN, "--root", "{tmp}/afile"], ["--root", "afile", "not a directory"]),
    Case("unknown-appended-trainer-key", [*RUN, "+trainer.foo=1"], ["trainer.foo", "trainer.epochs"]),
    Case(
        "storage-without-server",
        ["sweep", "{tmp}/tiny.yaml"],
        ["tiny.yaml", "storage", "alice:***@127.0.0.1:1"],
        _sweep_file(NO_SERVER),
    ),
    Case(
        "storage-dialect-misspelt",
        ["sweep", "demo", f"storage=postgress://alice:{PASSWORD}@127.0.0.1:1/db"],
        ["demo.yaml", "storage", "unknown database dialect 'postgress'"],
    ),
    Case(
        "option-before-override",  # intermixed: the override is read as one, and its URL checked
        ["sweep", "demo", "--launcher", "local", f"storage={NO_SERVER}"],
        ["demo.yaml", "storage", "cannot connect" if importlib.util.find_spec("psycopg") else "driver"],
    ),
    Case("workers-negative", ["sweep", "demo", "--workers", "-1"], ["--workers", ">= 1", "-1"]),
    Case("resume-workers-zero", ["resume", "demo", "--workers", "0"], ["--workers", ">= 1"]),
    Case(
        "eval-truncated-checkpoint",
        ["eval", "{tmp}/run"],
        ["best_model_combined.pt", "truncated or corrupt"],
        _run_dir_with_truncated_checkpoint,
    ),
    # the three weak messages
    Case("data-root-unset", [*RUN, "data=features"], ["data.root is required"], absent=["None"]),
    Case(
        "corrupt-npy",
        [*RUN, "data=features", "data.root={tmp}/feats"],
        ["feats/features/", ".npy", "not a numeric .npy array"],
        _corrupt_npy,
        absent=["allow_pickle", "unsafely", "pickle.load"],
    ),
    Case(
        "plot-missing-run-dir",
        ["plot", "{tmp}/no/such/run"],
        ["no/such/run", "no such run directory"],
        absent=["ablate sweep"],
    ),
    # more of the same kinds
    Case("argparse-rejects-a-url", ["sweep", "demo", "--launcher", NO_SERVER], ["--launcher", "alice:***@"]),
    Case(
        "run-dir-under-a-file",
        [*RUN, "--run-dir", "{tmp}/afile/sub"],
        ["--run-dir", "afile", "not a directory"],
    ),
    Case("sweep-root-is-a-file", ["sweep", "demo", "--root", "{tmp}/afile"], ["--root", "afile"]),
    Case("unknown-appended-key", [*RUN, "+model.foo=1"], ["model.foo"]),
    Case("appended-seed-in-trainer", [*RUN, "+trainer.seed=3"], ["trainer.seed"]),
    Case("lr-infinite", [*RUN, "trainer.lr=inf"], ["trainer.lr", "finite"]),
    Case(
        "bool-given-an-int",
        [*RUN, "loss.progress.fixes.position_encoding=1"],
        ["position_encoding", "true or false"],
    ),
    Case("seed-negative", [*RUN, "seed=-1"], ["seed", "2**32"]),
    Case("list-given-a-scalar", [*RUN, "data.split_fractions=0.5"], ["data.split_fractions", "list"]),
    Case("deleted-key", [*RUN, "~trainer.lr"], ["trainer.lr"]),
    Case("deleted-key-the-model-reads", [*RUN, "~model.base"], ["model.base is needed"]),
    Case("optimizer-unknown", [*RUN, "trainer.optimizer=sgd"], ["trainer.optimizer", "adamw"]),
    Case("threads-negative", [*RUN, "trainer.num_threads=-2"], ["num_threads", "positive"]),
    Case(
        "sqlite-folder-missing",
        ["sweep", "{tmp}/tiny.yaml"],
        ["tiny.yaml", "no such folder"],
        _sweep_file("sqlite:////no/such/dir/x.db"),
    ),
    Case(
        "status-sweep-json-corrupt",
        ["status", "old"],
        ["sweep.json", "not a sweep record"],
        _saved_sweep('"'),
    ),
    Case(
        "status-storage-without-server",
        ["status", "old"],
        ["sweep.json", "storage", "alice:***@"],
        _saved_sweep(NO_SERVER),
    ),
]
if importlib.util.find_spec("psycopg2") is None:
    CASES.append(
        Case(
            "storage-driver-missing",
            ["sweep", "{tmp}/tiny.yaml"],
            ["tiny.yaml", "storage", "psycopg2", "pip install 'ablate[postgres]'"],
            _sweep_file(NO_SERVER.replace("postgresql:", "postgresql+psycopg2:")),
        )
    )


def _tree(folder: Path) -> dict[str, tuple[bool, int, int]]:
    """Every path under `folder` with (is a dir, size, mtime): any write shows up."""
    return {
        str(p.relative_to(folder)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
    }


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_names_the_culprit_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ABLATE_ROOT", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a directory\n")
    case.setup(tmp_path)
    before, shipped = _tree(tmp_path), _tree(sweeps_dir())
    start = time.monotonic()
    code = main([a.format(tmp=tmp_path) for a in case.argv])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2, err
    for text in case.expect:
        assert text in err, (text, err)
    for text in [PASSWORD, "Traceback", "run failed", *case.absent]:
        assert text not in err, (text, err)
    assert _tree(tmp_path) == before, "bad input wrote into the results root or beside the input"
    assert _tree(sweeps_dir()) == shipped
    assert elapsed < 30, "an unreachable storage must fail within its connect timeout"


def test_env_results_root_that_is_a_file_is_named(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("ABLATE_ROOT", str(tmp_path / "afile"))
    assert main([*RUN, "trainer.epochs=1"]) == 2
    assert "ABLATE_ROOT" in capsys.readouterr().err


def test_overrides_after_options_are_read_as_overrides(results_root, capsys):
    assert main(["run", "progress_learnable", "--dry-run", "debug=fast", "trainer.epochs=3"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed.trainer.epochs == 3 and printed.experiment_name == "progress_learnable"
    assert not results_root.exists()


# ---------------------------------------------------------------- fuzz: generated overrides

FUZZ_EXAMPLES = int(os.environ.get("ABLATE_FUZZ_EXAMPLES", "12"))  # per experiment; fixed seed
EXPERIMENTS = group_options("experiment")
ODD_VALUES = [
    "0",
    "-1",
    "1e308",
    "-1e308",
    "1e999",
    "inf",
    "-inf",
    "nan",
    "1e-320",
    str(2**64),
    str(-(2**63)),
    "true",
    "false",
    "null",
    "''",
    "[]",
    "{}",
    "[1,2]",
    "{a: 1}",
    "[[",
    "]",
    "{",
    "'",
    '"',
    "abc",
    "???",
    "${seed}",
    "${nope}",
    "${",
    "a=b",
    "=",
    ",",
    "\\",
    "\u00e9\U0001f600",
    "1,2",
    "[a, [b]]",
    "0x10",
    "1_000",
]


def _like(value: object) -> st.SearchStrategy[str]:
    """Override text for a value of `value`'s type."""
    if isinstance(value, bool):
        return st.sampled_from(["true", "false"])
    if isinstance(value, int):
        return st.integers(min_value=-2, max_value=64).map(str)
    if isinstance(value, float):
        return st.floats(min_value=-1.0, max_value=10.0).map(repr)
    return st.text(alphabet="abcdefghij_", min_size=1, max_size=8)


def _overrides(experiment: str) -> st.SearchStrategy[list[str]]:
    """1-3 overrides of `experiment`: existing keys (and near misses) set to wrong types, extreme or
    malformed values; appended (+, ++) and deleted (~) keys; group options real and made up; raw text."""
    cfg = compose_experiment(experiment, ["debug=fast"])
    keys = flat_keys(cfg)
    leaves = [(k, v) for k in keys if not isinstance(v := OmegaConf.select(cfg, k), DictConfig | ListConfig)]
    groups = config_groups()
    key = st.one_of(
        st.sampled_from(keys),
        st.sampled_from(keys).map(lambda k: k + "x"),
        st.from_regex(r"[a-z_]{1,8}(\.[a-z_]{1,8}){0,2}", fullmatch=True),
        st.text(max_size=8),
    )
    value = st.one_of(
        st.sampled_from(ODD_VALUES),
        st.integers(min_value=-(2**70), max_value=2**70).map(str),
        st.floats().map(repr),
        st.text(max_size=10),
    )
    setting = st.builds(lambda p, k, v: f"{p}{k}={v}", st.sampled_from(["", "", "+", "++"]), key, value)
    deletion = key.map(lambda k: f"~{k}")
    # a value of the type the key holds, mostly small: inputs the checks should let through
    same_type = st.sampled_from(leaves).flatmap(lambda kv: _like(kv[1]).map(lambda v: f"{kv[0]}={v}"))
    group = st.sampled_from(groups).flatmap(
        lambda g: st.builds(
            lambda p, o: f"{p}{g}={o}",
            st.sampled_from(["", "+"]),
            st.one_of(st.sampled_from(group_options(g)), st.text(max_size=8)),
        )
    )
    anything = st.one_of(same_type, same_type, setting, setting, deletion, group, st.text(max_size=16))
    return st.lists(anything, min_size=1, max_size=3)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_generated_overrides_keep_the_contract(experiment, tmp_path, monkeypatch, capsys):
    """Whatever the overrides: exit 0 or 2 (never 1, never a traceback), and nothing written. `--dry-run`
    stops after validation, so no example trains (nor allocates what an extreme size asks for)."""
    root = tmp_path / "runs"
    monkeypatch.setenv("ABLATE_ROOT", str(root))
    monkeypatch.chdir(tmp_path)
    outcomes: list[int] = []

    @hypothesis.settings(
        max_examples=FUZZ_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(overrides=_overrides(experiment))
    def check(overrides: list[str]) -> None:
        capsys.readouterr()
        code = main(["run", experiment, "--dry-run", "debug=fast", *overrides])
        err = capsys.readouterr().err
        assert code in (0, 2), (overrides, err)
        assert "Traceback" not in err and "run failed" not in err, (overrides, err)
        assert code == 0 or "error" in err, (overrides, err)
        assert not root.exists() and sorted(tmp_path.iterdir()) == [], (overrides, err)
        outcomes.append(code)

    check()
    print(f"{experiment}: {len(outcomes)} inputs: {outcomes.count(2)} exit 2, {outcomes.count(0)} exit 0")


def test_mask_secrets_hides_every_password_in_a_message():
    from launchers.validate import mask_secrets

    text = (
        "invalid choice: 'storage=postgresql+psycopg://bob:p@ss:w0rd@db:5432/x' and "
        '"mysql://u:pw@h/d", dsn host=db password=hunter2 user=bob; sqlite:////tmp/x.db, http://carol@h/'
    )
    masked = mask_secrets(text)
    for secret in ("p@ss", "w0rd", ":pw@", "hunter2"):
        assert secret not in masked
    assert "postgresql+psycopg://bob:***@db:5432/x" in masked and "mysql://u:***@h/d" in masked
    assert "password=***" in masked and "sqlite:////tmp/x.db" in masked and "http://carol@h/" in masked


@pytest.mark.skipif(
    not os.environ.get("ABLATE_TEST_POSTGRES_URL"), reason="no PostgreSQL (tests/postgres/start_postgres.sh)"
)
def test_a_real_server_passes_and_a_wrong_password_is_named_not_printed(tmp_path, monkeypatch, capsys):
    from sqlalchemy.engine import make_url

    from launchers.validate import check_storage

    url = os.environ["ABLATE_TEST_POSTGRES_URL"]
    check_storage(url, "sweep.yaml")  # reachable, credentials right: nothing raised
    wrong = make_url(url).set(password=PASSWORD).render_as_string(hide_password=False)
    _sweep_file(wrong)(tmp_path)
    monkeypatch.setenv("ABLATE_ROOT", str(tmp_path / "runs"))
    before = _tree(tmp_path)
    assert main(["sweep", str(tmp_path / "tiny.yaml")]) == 2
    err = capsys.readouterr().err
    assert "tiny.yaml: storage: cannot connect" in err and "password authentication failed" in err
    assert PASSWORD not in err and _tree(tmp_path) == before
