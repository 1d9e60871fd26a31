"""Sweep files: the shipped ones load and expand into the right trials; every mistake in a sweep file is
one SweepError naming the file and the key, raised before anything is written."""

import copy
import dataclasses
import json
import re

import optuna
import pytest
import yaml

from launchers.config import compose_experiment
from launchers.sweeps.spec import load_sweep, sweeps_dir
from sweepstate.spec import PRUNERS, SAMPLERS, SweepError, SweepSpec, trial_key

SHIPPED = ("demo", "progress_search", "progress_methods")


@pytest.fixture(scope="module")
def shipped() -> dict[str, SweepSpec]:
    return {path.stem: load_sweep(path) for path in sorted(sweeps_dir().glob("*.yaml"))}


def test_every_shipped_sweep_loads(shipped):
    assert set(SHIPPED) <= set(shipped)
    for name, spec in shipped.items():
        assert spec.name == name
    for name in ("demo", "progress_search", "progress_methods", "progress_head_study"):
        assert shipped[name].metric.endswith("ogpe_action") and shipped[name].direction == "minimize"
    assert shipped["progress_head_study"].budget == 8 * 3 * 2 * 3
    assert shipped["progress_search"].mode == "search"
    assert shipped["demo"].mode == shipped["progress_methods"].mode == "grid"


def test_budgets(shipped):
    assert shipped["progress_methods"].budget == 4 * 4 * 3
    assert shipped["demo"].budget == 3 * 2
    assert shipped["progress_search"].budget == shipped["progress_search"].n_trials == 24


def test_grid_points_are_the_cartesian_product_first_axis_slowest(shipped):
    points = shipped["progress_methods"].grid_points()
    assert len(points) == 16 and len({tuple(p.items()) for p in points}) == 16
    assert points[:5] == [
        {"method": "none", "loss/alignment": "gtcc"},
        {"method": "none", "loss/alignment": "tcc"},
        {"method": "none", "loss/alignment": "lav"},
        {"method": "none", "loss/alignment": "vava"},
        {"method": "cumulative_l2", "loss/alignment": "gtcc"},
    ]
    assert shipped["demo"].grid_points() == [
        {"loss/progress": "none"},
        {"loss/progress": "cumulative_l2"},
        {"loss/progress": "learnable"},
    ]
    assert shipped["progress_search"].grid_points() == []


def test_grid_trial_overrides_expand_named_axes_into_their_bundles(shipped):
    spec = shipped["progress_methods"]
    assert spec.trial_overrides({"method": "learnable_ab", "loss/alignment": "vava"}, 2) == [
        *spec.overrides,
        "loss/progress=learnable",
        "loss.progress.fixes.position_encoding=true",
        "loss.progress.fixes.learnable_h0=true",
        "loss/alignment=vava",
        "seed=2",
    ]
    demo = shipped["demo"]
    assert demo.trial_overrides({"loss/progress": "none"}, 1) == [
        *demo.overrides,
        "loss/progress=none",
        "seed=1",
    ]


def test_search_trial_overrides_compose_to_the_sampled_values(shipped):
    spec = shipped["progress_search"]
    params = {
        "loss.progress.fixes.learnable_h0": True,  # given out of order: the spec's order is used
        "loss.progress.lambda": 1.5e-05 * 100,
        "loss.progress.curriculum.enabled": False,
        "loss.progress.curriculum.start": 0.002,
        "loss.progress.curriculum.end": 3.0,
        "loss.progress.min_segment_len": 7,
        "loss.progress.fixes.position_encoding": True,
    }
    overrides = spec.trial_overrides(params, 1)
    assert overrides[: len(spec.overrides)] == list(spec.overrides)
    assert overrides[-1] == "seed=1"
    assert [o.split("=")[0] for o in overrides[len(spec.overrides) : -1]] == [p.path for p in spec.params]
    cfg = compose_experiment(spec.experiment, overrides)
    p = cfg.loss.progress
    assert p["lambda"] == params["loss.progress.lambda"] and p.min_segment_len == 7
    assert (
        p.fixes.position_encoding is True and p.fixes.learnable_h0 is True and p.curriculum.enabled is False
    )
    assert cfg.seed == 1


def test_search_params_become_optuna_distributions(shipped):
    dists = {p.path: p.distribution() for p in shipped["progress_search"].params}
    assert dists["loss.progress.lambda"] == optuna.distributions.FloatDistribution(1e-3, 10.0, log=True)
    assert dists["loss.progress.min_segment_len"] == optuna.distributions.IntDistribution(2, 12)
    assert dists["loss.progress.curriculum.enabled"] == optuna.distributions.CategoricalDistribution(
        [False, True]
    )


def test_search_over_a_config_group(tmp_path):
    doc = edit(
        SEARCH, **{"search.params.loss/alignment": {"type": "categorical", "choices": ["gtcc", "tcc"]}}
    )
    spec = load_sweep(write(tmp_path, doc))
    params = {"loss.progress.lambda": 0.1, "loss.progress.min_segment_len": 3}
    params |= {"loss.progress.curriculum.enabled": True, "loss/alignment": "tcc"}
    assert "loss/alignment=tcc" in spec.trial_overrides(params, 0)


@pytest.mark.parametrize(
    ("params", "seed"),
    [
        ({"method": "none"}, 0),  # an axis missing
        ({"method": "none", "loss/alignment": "gtcc", "seed": 0}, 0),  # the seed is not a param
        ({"method": "nope", "loss/alignment": "gtcc"}, 0),  # no such label
        ({"method": "none", "loss/alignment": "gtcc"}, 7),  # not one of the sweep's seeds
    ],
)
def test_trial_overrides_reject_params_of_another_sweep(shipped, params, seed):
    with pytest.raises(SweepError, match=re.escape("progress_methods.yaml")):
        shipped["progress_methods"].trial_overrides(params, seed)


def test_trial_key_is_stable_and_tells_trials_apart():
    key = trial_key("s", {"a": 1, "b": "x"}, 0)
    assert re.fullmatch(r"[0-9a-f]{12}", key)
    assert trial_key("s", {"b": "x", "a": 1}, 0) == key
    others = [
        trial_key("s", {"a": 2, "b": "x"}, 0),
        trial_key("s", {"a": 1, "b": "y"}, 0),
        trial_key("s", {"a": 1, "b": "x"}, 1),
        trial_key("t", {"a": 1, "b": "x"}, 0),
        trial_key("s", {"a": 1.0, "b": "x"}, 0),
    ]
    assert len({key, *others}) == 6


def test_to_dict_round_trips_through_json(shipped):
    for spec in shipped.values():
        data = json.loads(json.dumps(spec.to_dict()))
        assert data == spec.to_dict()
        back = SweepSpec.from_dict(data)
        assert back == spec
        assert back.grid_points() == spec.grid_points() and back.budget == spec.budget


def test_shipped_samplers_and_pruners(shipped):
    search = shipped["progress_search"]
    sampler = search.make_sampler(3)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._multivariate and sampler._constant_liar and sampler._n_startup_trials == 8
    pruner = search.make_pruner()
    assert isinstance(pruner, optuna.pruners.MedianPruner) and pruner._n_warmup_steps == 2
    grid = shipped["progress_methods"]
    assert isinstance(grid.make_sampler(0), optuna.samplers.RandomSampler)
    assert isinstance(grid.make_pruner(), optuna.pruners.NopPruner)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_name_builds(shipped, name):
    spec = dataclasses.replace(shipped["progress_search"], sampler={"name": name, "options": {}})
    assert isinstance(spec.make_sampler(0), SAMPLERS[name][0])


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_every_pruner_name_builds(shipped, name):
    options = {"percentile": {"percentile": 25.0}, "threshold": {"upper": 1.0}}.get(name, {})
    spec = dataclasses.replace(shipped["progress_search"], pruner={"name": name, "options": options})
    assert isinstance(spec.make_pruner(), PRUNERS[name])


GRID = {
    "experiment": "progress_learnable",
    "overrides": ["debug=fast"],
    "objective": {"metric": "val/ogpe_action", "direction": "minimize"},
    "seeds": [0, 1],
    "grid": {"loss.progress.k": [1, 2]},
}
SEARCH = {
    **{k: v for k, v in GRID.items() if k != "grid"},
    "search": {
        "n_trials": 4,
        "params": {
            "loss.progress.lambda": {"type": "float", "low": 0.01, "high": 1.0, "log": True},
            "loss.progress.min_segment_len": {"type": "int", "low": 2, "high": 4},
            "loss.progress.curriculum.enabled": {"type": "categorical", "choices": [True, False]},
        },
    },
}
DELETE = object()


def edit(base: dict, **changes) -> dict:
    """`base` with `changes` by dotted path (`__` stands for a dot inside a key, DELETE removes the key)."""
    doc = copy.deepcopy(base)
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = doc
        for part in parents:
            node = node.setdefault(part.replace("__", "."), {})
        if value is DELETE:
            del node[leaf.replace("__", ".")]
        else:
            node[leaf.replace("__", ".")] = value
    return doc


def write(tmp_path, doc) -> str:
    path = tmp_path / "bad_sweep.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def test_table_bases_are_valid_and_sweep_overrides_apply(tmp_path):
    spec = load_sweep(write(tmp_path, GRID), ["seeds=[0]", "workers=3", "grid[loss.progress.k]=[1,2,3]"])
    assert (spec.seeds, spec.workers, spec.budget) == ((0,), 3, 3)
    spec = load_sweep(write(tmp_path, SEARCH), ["search.n_trials=7", "lease.timeout_s=30"])
    assert (spec.budget, spec.timeout_s, spec.name) == (7, 30.0, "bad_sweep")


LAMBDA = "search.params.loss__progress__lambda"
MSL = "search.params.loss__progress__min_segment_len"
BAD = [
    ("unknown top-level key", edit(GRID, wrokers=2), "wrokers"),
    ("unknown nested key", edit(GRID, lease={"timeout": 3}), "lease.timeout"),
    ("unknown experiment", edit(GRID, experiment="progress_lernable"), "experiment"),
    ("bad fixed override", edit(GRID, overrides=["debug=fast", "trainer.epochz=3"]), "trainer.epochz"),
    (
        "unknown param path",
        edit(SEARCH, **{"search.params.loss__progress__lamda": {"type": "float", "low": 0.1, "high": 1.0}}),
        "search.params.loss.progress.lamda",
    ),
    ("unknown grid path", edit(GRID, grid={"loss.progress.kk": [1, 2]}), "grid.loss.progress.kk"),
    ("grid path is a section", edit(GRID, grid={"loss.progress.fixes": [1, 2]}), "grid.loss.progress.fixes"),
    ("unknown group option", edit(GRID, grid={"loss/alignment": ["gtcc", "tccc"]}), "tccc"),
    ("unknown group", edit(GRID, grid={"loss/alignmnt": ["gtcc"]}), "grid.loss/alignmnt"),
    ("low >= high", edit(SEARCH, **{f"{LAMBDA}.low": 2.0}), "search.params.loss.progress.lambda.low"),
    ("log with low <= 0", edit(SEARCH, **{f"{LAMBDA}.low": 0.0}), "search.params.loss.progress.lambda.low"),
    ("step > range", edit(SEARCH, **{f"{MSL}.step": 5}), "search.params.loss.progress.min_segment_len.step"),
    ("step not dividing range", edit(SEARCH, **{f"{MSL}.high": 5, f"{MSL}.step": 2}), "min_segment_len.step"),
    (
        "int with float bound",
        edit(SEARCH, **{f"{MSL}.low": 2.5}),
        "search.params.loss.progress.min_segment_len.low",
    ),
    ("unknown param type", edit(SEARCH, **{f"{LAMBDA}.type": "loguniform"}), "lambda.type"),
    (
        "empty choices",
        edit(SEARCH, **{"search.params.loss__progress__curriculum__enabled.choices": []}),
        "curriculum.enabled",
    ),
    (
        "range end the config rejects",
        edit(SEARCH, **{f"{LAMBDA}.low": -1.0, f"{LAMBDA}.log": False}),
        "loss.progress.lambda",
    ),
    (
        "unknown group option in a search param",
        edit(
            SEARCH, **{"search.params.loss/alignment": {"type": "categorical", "choices": ["gtcc", "lavv"]}}
        ),
        "search.params.loss/alignment",
    ),
    (
        "grid value Hydra cannot express",
        edit(GRID, grid={"loss.progress.k": [{"a": 1}]}),
        "grid.loss.progress.k",
    ),
    ("empty grid axis", edit(GRID, grid={"loss.progress.k": []}), "grid.loss.progress.k"),
    ("empty named axis", edit(GRID, grid={"method": {}}), "grid.method"),
    (
        "bundle that does not compose",
        edit(GRID, grid={"m": {"a": ["loss.progress.fixes.posenc=true"]}}),
        "loss.progress.fixes.posenc",
    ),
    ("seed as an axis", edit(GRID, grid={"seed": [0, 1]}), "grid.seed"),
    (
        "axis overlaps a fixed override",
        edit(GRID, overrides=["debug=fast", "loss.progress.k=3"]),
        "loss.progress.k",
    ),
    ("both search and grid", {**SEARCH, "grid": GRID["grid"]}, "grid"),
    ("neither search nor grid", edit(GRID, grid=DELETE), "search"),
    ("metric never logged", edit(GRID, objective={"metric": "val/ogpe_actoin"}), "val/ogpe_actoin"),
    (
        "metric missing at a method=none point",
        edit(GRID, grid={"loss/progress": ["learnable", "none"]}, objective={"metric": "val/progress_loss"}),
        "loss/progress=none",
    ),
    ("bad direction", edit(GRID, **{"objective.direction": "minimise"}), "objective.direction"),
    ("empty seeds", edit(GRID, seeds=[]), "seeds"),
    ("non-int seeds", edit(GRID, seeds=[0, "1"]), "seeds"),
    ("n_trials 0", edit(SEARCH, **{"search.n_trials": 0}), "search.n_trials"),
    ("unknown sampler", edit(SEARCH, **{"search.sampler": {"name": "cmaes"}}), "search.sampler.name"),
    (
        "bad sampler option",
        edit(SEARCH, **{"search.sampler": {"name": "tpe", "options": {"n_start": 3}}}),
        "search.sampler.options",
    ),
    ("unknown pruner", edit(SEARCH, **{"search.pruner": {"name": "asha"}}), "search.pruner.name"),
    (
        "bad pruner option",
        edit(SEARCH, **{"search.pruner": {"name": "median", "options": {"n_warmup": 1}}}),
        "search.pruner.options",
    ),
    (
        "options on the none pruner",
        edit(SEARCH, **{"search.pruner": {"name": "none", "options": {"x": 1}}}),
        "search.pruner.options",
    ),
    ("workers 0", edit(GRID, workers=0), "workers"),
    ("timeout_s <= heartbeat_s", edit(GRID, lease={"heartbeat_s": 10, "timeout_s": 10}), "lease.timeout_s"),
    ("bad storage", edit(GRID, storage="postgres"), "storage"),
    ("unknown launcher", edit(GRID, launcher={"name": "k8s"}), "launcher.name"),
    ("invalid YAML", "experiment: [progress_learnable\nseeds: [0]\n", "YAML"),
    ("not a mapping", "- experiment\n", "top level"),
]


@pytest.mark.parametrize(("doc", "culprit"), [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_sweep_file_names_file_and_key(tmp_path, doc, culprit):
    with pytest.raises(SweepError) as info:
        load_sweep(write(tmp_path, doc))
    message = str(info.value)
    assert message.startswith(str(tmp_path / "bad_sweep.yaml")), message
    assert culprit in message, message


@pytest.mark.parametrize(
    ("override", "culprit"),
    [
        ("serach.n_trials=4", "serach"),
        ("lease.timeout=3", "lease.timeout"),
        ("workers", "workers"),
        ("overrides=[data.split_fractions=[0.5,0.5]]", "overrides"),  # unquoted nested list: bad YAML
    ],
)
def test_bad_sweep_override_names_the_key(tmp_path, override, culprit):
    with pytest.raises(SweepError, match=re.escape(culprit)) as info:
        load_sweep(write(tmp_path, SEARCH), [override])
    assert "bad_sweep.yaml" in str(info.value)


def test_unknown_sweep_name_lists_the_available_ones():
    with pytest.raises(SweepError, match="progress_search") as info:
        load_sweep("progress_serach")
    assert "progress_methods" in str(info.value)


def test_load_sweep_finds_names_in_the_sweeps_dir_and_creates_nothing(tmp_path, monkeypatch):
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    (sweeps / "mini.yaml").write_text(yaml.safe_dump(GRID))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("ABLATE_SWEEPS_DIR", str(sweeps))
    monkeypatch.setenv("ABLATE_ROOT", str(tmp_path / "root"))
    spec = load_sweep("mini")
    assert spec.name == "mini" and spec.path == str(sweeps / "mini.yaml")
    assert spec.budget == 4
    assert list(work.iterdir()) == [] and not (tmp_path / "root").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweeps", "work"]
    assert [p.name for p in sweeps.iterdir()] == ["mini.yaml"]
