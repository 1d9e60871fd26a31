"""Sweep files: the schema of `sweeps/<name>.yaml`, its validation, and the Hydra overrides of each trial.

A sweep is checked completely when it is loaded - the experiment and every trial configuration compose,
every swept path exists, the objective is logged by every trial, the sampler and pruner accept their
options - so that a typo costs one error message naming the file and the key, not a cluster allocation
full of failed trials. Loading writes nothing.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

from core.train.families import logged_metrics
from launchers.config import (
    ConfigError,
    compose_experiment,
    config_groups,
    flat_keys,
    group_options,
    keys_near,
)
from sweepstate.spec import (
    GRID_PRUNER,
    GRID_SAMPLER,
    PRUNERS,
    SAMPLERS,
    GridAxis,
    ParamSpec,
    SweepError,
    SweepSpec,
    _render,
)

PARAM_TYPES = ("float", "int", "categorical")
DIRECTIONS = ("minimize", "maximize")
LAUNCHERS = ("local", "slurm")
# The keys a sweep file may hold; None: a leaf or a free-form section whose content is checked by type.
_SCHEMA: dict[str, Any] = {
    "experiment": None,
    "overrides": None,
    "objective": {"metric": None, "direction": None},
    "seeds": None,
    "search": {
        "n_trials": None,
        "params": None,
        "sampler": {"name": None, "options": None},
        "pruner": {"name": None, "options": None},
    },
    "grid": None,
    "storage": None,
    "workers": None,
    "lease": {"heartbeat_s": None, "timeout_s": None, "max_retries": None},
    "launcher": {"name": None, "slurm": None},
}
_MISSING = object()
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def sweeps_dir() -> Path:
    env = os.environ.get("ABLATE_SWEEPS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "sweeps"


def _override_keys(overrides: Sequence[str]) -> list[str]:
    return [ov.key_or_group for ov in OverridesParser.create().parse_overrides(list(overrides))]


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _suggest(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"({hint}valid: {', '.join(options)})"


def _locate(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    is_path = text.endswith((".yaml", ".yml")) or "/" in text or os.sep in text
    path = Path(text) if is_path else sweeps_dir() / f"{text}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in sweeps_dir().glob("*.yaml"))
        raise SweepError(f"{_shown(path)}: no such sweep file {_suggest(path.stem, available)}")
    path = path.resolve()
    if not _SAFE_NAME.fullmatch(path.stem):
        raise SweepError(f"{_shown(path)}: the sweep name '{path.stem}' must match {_SAFE_NAME.pattern}")
    return path


def _check_keys(where: str, node: dict, schema: dict, prefix: str = "") -> None:
    for key, value in node.items():
        if key not in schema:
            raise SweepError(f"{where}: {prefix}{key}: unknown key {_suggest(str(key), list(schema))}")
        if isinstance(schema[key], dict) and isinstance(value, dict):
            _check_keys(where, value, schema[key], f"{prefix}{key}.")


def _check_override_key(where: str, override: str) -> None:
    key, eq, _ = override.partition("=")
    if not eq:
        raise SweepError(f"{where}: override '{override}': expected key=value")
    node: Any = _SCHEMA
    done: list[str] = []
    for part in key.split("[")[0].split("."):
        if not isinstance(node, dict):
            return
        if part not in node:
            bad = ".".join([*done, part])
            raise SweepError(
                f"{where}: {bad}: unknown key in override '{override}' {_suggest(part, list(node))}"
            )
        node = node[part]
        done.append(part)


def _read(path: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """The sweep file with `overrides` (OmegaConf dotlist) applied, as plain Python data."""
    where = _shown(path)
    try:
        cfg = OmegaConf.load(path)
    except (YAMLError, OmegaConfBaseException) as exc:
        raise SweepError(f"{where}: invalid YAML: {exc}") from exc
    if not isinstance(cfg, DictConfig):
        raise SweepError(f"{where}: the top level must be a mapping of keys {list(_SCHEMA)}")
    _check_keys(where, OmegaConf.to_container(cfg), _SCHEMA)
    for override in overrides:
        _check_override_key(where, override)
    try:
        return OmegaConf.to_container(
            OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides))), resolve=True
        )
    except (YAMLError, OmegaConfBaseException) as exc:  # a value's YAML (e.g. an unquoted nested list)
        raise SweepError(f"{where}: overrides {list(overrides)}: {exc}") from exc


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _Reader:
    """Turns one sweep file's data into a SweepSpec, checking everything that needs no composed config."""

    def __init__(self, path: Path, raw: dict[str, Any]) -> None:
        self.path = path
        self.where = _shown(path)
        self.raw = raw
        self.groups = config_groups()
        self.value_paths: list[tuple[str, str]] = []  # (file key, config path) to check in the config

    def error(self, key: str, msg: str) -> SweepError:
        return SweepError(f"{self.where}: {key}: {msg}")

    def mapping(self, key: str, value: Any, default: dict | None = None) -> dict:
        if value is None and default is not None:
            return default
        if not isinstance(value, dict):
            raise self.error(key, f"must be a mapping, got {value!r}")
        return value

    def integer(self, key: str, value: Any, minimum: int) -> int:
        if not _is_int(value) or value < minimum:
            raise self.error(key, f"must be an integer >= {minimum}, got {value!r}")
        return value

    def seconds(self, key: str, value: Any) -> float:
        if not _is_number(value) or value <= 0:
            raise self.error(key, f"must be a number of seconds > 0, got {value!r}")
        return float(value)

    def spec(self) -> SweepSpec:
        raw = self.raw
        experiment = raw.get("experiment")
        experiments = group_options("experiment")
        if experiment not in experiments:
            raise self.error(
                "experiment", f"unknown experiment {experiment!r} {_suggest(str(experiment), experiments)}"
            )
        overrides = raw.get("overrides") or []
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise self.error("overrides", f"must be a list of Hydra overrides key=value, got {overrides!r}")
        objective = self.mapping("objective", raw.get("objective"))
        metric, direction = objective.get("metric"), objective.get("direction", "minimize")
        if not isinstance(metric, str) or not metric:
            raise self.error(
                "objective.metric", f"must name a logged metric like val/ogpe_action, got {metric!r}"
            )
        if direction not in DIRECTIONS:
            raise self.error("objective.direction", f"{direction!r} is not one of {list(DIRECTIONS)}")
        seeds = raw.get("seeds", [0])
        if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds):
            raise self.error("seeds", f"must be a non-empty list of integers, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise self.error("seeds", f"repeats a seed: {seeds}")
        if ("search" in raw) == ("grid" in raw):
            raise self.error("search/grid", "give exactly one of `search` (Optuna) or `grid` (ablation axes)")
        mode = "search" if "search" in raw else "grid"
        search = self.mapping("search", raw["search"]) if mode == "search" else {}
        lease = self.mapping("lease", raw.get("lease"), {})
        heartbeat_s = self.seconds("lease.heartbeat_s", lease.get("heartbeat_s", 10))
        timeout_s = self.seconds("lease.timeout_s", lease.get("timeout_s", 60))
        if timeout_s <= heartbeat_s:
            raise self.error(
                "lease.timeout_s", f"{timeout_s} must be longer than lease.heartbeat_s={heartbeat_s}"
            )
        spec = SweepSpec(
            name=self.path.stem,
            path=str(self.path),
            experiment=experiment,
            overrides=tuple(overrides),
            metric=metric,
            direction=direction,
            seeds=tuple(seeds),
            mode=mode,
            n_trials=self.integer("search.n_trials", search.get("n_trials"), 1) if mode == "search" else None,
            params=self.params(search.get("params")) if mode == "search" else (),
            sampler=self.choice("search.sampler", search.get("sampler"), SAMPLERS, "tpe")
            if mode == "search"
            else GRID_SAMPLER,
            pruner=self.choice("search.pruner", search.get("pruner"), PRUNERS, "median")
            if mode == "search"
            else GRID_PRUNER,
            grid=self.grid(raw["grid"]) if mode == "grid" else (),
            storage=self.storage(raw.get("storage")),
            workers=self.integer("workers", raw.get("workers", 2), 1),
            heartbeat_s=heartbeat_s,
            timeout_s=timeout_s,
            max_retries=self.integer("lease.max_retries", lease.get("max_retries", 2), 0),
            launcher=self.launcher(raw.get("launcher")),
        )
        self.check_disjoint(spec)
        try:
            spec.make_sampler(0)
        except (TypeError, ValueError) as exc:
            raise self.error("search.sampler.options", f"{spec.sampler['name']}: {exc}") from exc
        try:
            spec.make_pruner()
        except (TypeError, ValueError) as exc:
            raise self.error("search.pruner.options", f"{spec.pruner['name']}: {exc}") from exc
        return spec

    def params(self, params: Any) -> tuple[ParamSpec, ...]:
        if not isinstance(params, dict) or not params:
            raise self.error(
                "search.params", "must map config paths to parameters like {type: float, low, high}"
            )
        return tuple(self.param(str(path), d) for path, d in params.items())

    def param(self, path: str, d: Any) -> ParamSpec:
        key = f"search.params.{path}"
        d = self.mapping(key, d)
        kind = d.get("type")
        if kind not in PARAM_TYPES:
            raise self.error(f"{key}.type", f"{kind!r} is not one of {list(PARAM_TYPES)}")
        allowed = ["type", "choices"] if kind == "categorical" else ["type", "low", "high", "log", "step"]
        for k in d:
            if k not in allowed:
                raise self.error(f"{key}.{k}", f"unknown key for a {kind} parameter {_suggest(k, allowed)}")
        if path == "seed":
            raise self.error(key, "the seed is not searched: list the seeds under `seeds`")
        if kind == "categorical":
            return ParamSpec(path, kind, choices=self.values(key, path, d.get("choices"), "choices"))
        if path in self.groups or "/" in path:
            raise self.error(key, "a config group is searched as {type: categorical, choices: [...]}")
        self.value_paths.append((key, path))
        return self.numeric(key, path, kind, d)

    def numeric(self, key: str, path: str, kind: str, d: dict) -> ParamSpec:
        low, high, log, step = d.get("low"), d.get("high"), d.get("log", False), d.get("step")
        valid, what = (_is_int, "an integer") if kind == "int" else (_is_number, "a number")
        for name, value in (("low", low), ("high", high)):
            if not valid(value):
                raise self.error(f"{key}.{name}", f"must be {what}, got {value!r}")
        if low >= high:
            raise self.error(f"{key}.low", f"low={low} must be < high={high}")
        if not isinstance(log, bool):
            raise self.error(f"{key}.log", f"must be true or false, got {log!r}")
        if log and low <= 0:
            raise self.error(f"{key}.low", f"a log-scale range needs low > 0, got {low}")
        if step is not None:
            if log:
                raise self.error(f"{key}.step", "a log-scale range takes no step")
            if not valid(step) or step <= 0 or step > high - low:
                raise self.error(
                    f"{key}.step", f"must be {what} in (0, high - low = {high - low}], got {step!r}"
                )
            if (Decimal(str(high)) - Decimal(str(low))) % Decimal(str(step)) != 0:
                raise self.error(f"{key}.step", f"high - low = {high - low} is not a multiple of step={step}")
        if kind == "float":
            low, high = float(low), float(high)
        return ParamSpec(path, kind, low=low, high=high, log=log, step=step)

    def values(self, key: str, path: str, values: Any, what: str) -> tuple[Any, ...]:
        """Checked values of a config group (its options) or of a config path (renderable, distinct)."""
        if not isinstance(values, list) or not values:
            raise self.error(key, f"needs a non-empty list of {what}, got {values!r}")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise self.error(key, f"repeats a value: {values}")
        if path in self.groups:
            options = group_options(path)
            for v in values:
                if v not in options:
                    raise self.error(
                        key, f"no option {v!r} in config group '{path}' {_suggest(str(v), options)}"
                    )
            return tuple(values)
        if "/" in path:
            raise self.error(key, f"no such config group {_suggest(path, self.groups)}")
        for v in values:
            try:
                _render(v)
            except ValueError as exc:
                raise self.error(key, str(exc)) from exc
        self.value_paths.append((key, path))
        return tuple(values)

    def grid(self, grid: Any) -> tuple[GridAxis, ...]:
        if not isinstance(grid, dict) or not grid:
            raise self.error("grid", "must map axes (a config group, a config path or a name) to values")
        return tuple(self.axis(str(name), values) for name, values in grid.items())

    def axis(self, name: str, values: Any) -> GridAxis:
        key = f"grid.{name}"
        if name == "seed":
            raise self.error(key, "the seed is not an axis: list the seeds under `seeds`")
        if isinstance(values, dict):  # a named axis: label -> override bundle
            if not values:
                raise self.error(key, "a named axis needs at least one label: [overrides]")
            options = []
            for label, bundle in values.items():
                if not isinstance(bundle, list) or not all(isinstance(o, str) for o in bundle):
                    raise self.error(f"{key}.{label}", f"must be a list of Hydra overrides, got {bundle!r}")
                try:
                    _override_keys(bundle)
                except HydraException as exc:
                    raise self.error(f"{key}.{label}", str(exc)) from exc
                options.append((str(label), tuple(bundle)))
            return name, tuple(options)
        checked = self.values(key, name, values, "values")
        labels = [v if isinstance(v, str) else _render(v) for v in checked]
        return name, tuple(
            (label, (f"{name}={_render(v)}",)) for label, v in zip(labels, checked, strict=True)
        )

    def choice(self, key: str, value: Any, table: dict[str, Any], default: str) -> dict[str, Any]:
        value = self.mapping(key, value, {"name": default})
        name, options = value.get("name", default), value.get("options") or {}
        if name not in table:
            raise self.error(
                f"{key}.name", f"unknown {key.split('.')[-1]} {name!r} {_suggest(str(name), list(table))}"
            )
        if not isinstance(options, dict):
            raise self.error(f"{key}.options", f"must be a mapping of keyword arguments, got {options!r}")
        if "seed" in options and key == "search.sampler":
            raise self.error(
                f"{key}.options.seed", "the sampler seed is given per worker by make_sampler(seed)"
            )
        return {"name": name, "options": options}

    def storage(self, storage: Any) -> str | None:
        if storage is None or storage == "sqlite" or (isinstance(storage, str) and "://" in storage):
            return storage
        raise self.error(
            "storage", f"must be null (journal file), 'sqlite' or an Optuna RDB URL, got {storage!r}"
        )

    def launcher(self, launcher: Any) -> dict[str, Any]:
        launcher = self.mapping("launcher", launcher, {"name": "local"})
        name = launcher.get("name", "local")
        if name not in LAUNCHERS:
            raise self.error("launcher.name", f"unknown launcher {name!r} {_suggest(str(name), LAUNCHERS)}")
        if not isinstance(launcher.get("slurm", {}), dict):
            raise self.error("launcher.slurm", "must be a mapping of SLURM resources")
        return {**launcher, "name": name}

    def check_disjoint(self, spec: SweepSpec) -> None:
        """No two sources set the same key: a later Hydra override would silently win over an earlier one."""
        sources = [("overrides", _override_keys(spec.overrides)), ("seeds", ["seed"])]
        sources += [(f"search.params.{p.path}", [p.path]) for p in spec.params]
        for axis, options in spec.grid:
            sources.append(
                (f"grid.{axis}", sorted({k for _, bundle in options for k in _override_keys(bundle)}))
            )
        owner: dict[str, str] = {}
        for source, keys in sources:
            for k in keys:
                if owner.setdefault(k, source) != source:
                    raise self.error(source, f"sets '{k}', which {owner[k]} sets already")


def _trial_configs(spec: SweepSpec) -> list[tuple[str, str, list[str]]]:
    """(file key, description, overrides) of the trial configurations that validation composes.

    Grid: every point (first seed). Search: every categorical choice and both ends of every range,
    taken together, so a range end the config rejects is caught before a trial samples it."""
    if spec.mode == "grid":
        return [
            (
                "grid",
                "point (" + ", ".join(f"{a}={v}" for a, v in point.items()) + ")",
                spec.trial_overrides(point, spec.seeds[0]),
            )
            for point in spec.grid_points()
        ]
    n = max([2, *(len(p.choices) for p in spec.params)])
    out = []
    for j in range(n):
        params = {
            p.path: p.choices[j % len(p.choices)] if p.choices else (p.low, p.high)[j % 2]
            for p in spec.params
        }
        desc = "trial (" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")"
        out.append(("search.params", desc, spec.trial_overrides(params, spec.seeds[0])))
    return out


def _check_configs(reader: _Reader, spec: SweepSpec) -> None:
    """Everything that needs the composed experiment: overrides, swept paths, trial configs, the metric."""
    try:
        base = compose_experiment(spec.experiment, list(spec.overrides))
    except ConfigError as exc:
        raise reader.error("overrides", str(exc)) from exc
    keys = flat_keys(base)
    for key, path in reader.value_paths:
        node = OmegaConf.select(base, path, default=_MISSING)
        if node is _MISSING:
            raise reader.error(
                key, f"no such config path in experiment '{spec.experiment}' (near: {keys_near(path, keys)})"
            )
        if isinstance(node, DictConfig):
            raise reader.error(
                key, f"'{path}' is a config section; sweep one of its values or a config group"
            )
    for key, desc, overrides in _trial_configs(spec):
        try:
            cfg = compose_experiment(spec.experiment, overrides)
        except ConfigError as exc:
            raise reader.error(key, f"{desc} does not compose: {exc}") from exc
        logged = logged_metrics(cfg)
        if spec.metric not in logged:
            raise reader.error(
                "objective.metric",
                f"'{spec.metric}' is not logged by {desc}; logged: {', '.join(sorted(logged))}",
            )


def load_sweep(name_or_path: str | Path, overrides: Sequence[str] = ()) -> SweepSpec:
    """The validated sweep `sweeps/<name>.yaml` (or a .yaml path) with dotlist `overrides` on the file.

    SweepError names the file and the key of the first problem. Nothing is written."""
    path = _locate(name_or_path)
    reader = _Reader(path, _read(path, overrides))
    spec = reader.spec()
    _check_configs(reader, spec)
    return spec
