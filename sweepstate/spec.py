"""The sweep spec: what one sweep runs (its trials' overrides, objective, sampler, pruner, storage,
lease), as stored in the study so that every worker and every reader runs and reads the same sweep.

Reading and validating a sweep file is the launcher's business (launchers/sweeps/spec.py); this
module only holds the validated result, so that analysis can read it without importing launchers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
import warnings
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser


class SweepError(ValueError):
    """A sweep file or sweep override that cannot run; the message names the file and the key."""


# name -> (class, keyword defaults that `options` may override)
SAMPLERS: dict[str, tuple[type[optuna.samplers.BaseSampler], dict[str, Any]]] = {
    "tpe": (optuna.samplers.TPESampler, {"multivariate": True, "constant_liar": True}),
    "random": (optuna.samplers.RandomSampler, {}),
    "gp": (optuna.samplers.GPSampler, {}),
    "qmc": (optuna.samplers.QMCSampler, {}),
}
PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "wilcoxon": optuna.pruners.WilcoxonPruner,
    "threshold": optuna.pruners.ThresholdPruner,
    "none": optuna.pruners.NopPruner,
}
# Grid trials carry all their parameters from the queue: the sampler is never consulted, nothing is pruned.
GRID_SAMPLER = {"name": "random", "options": {}}
GRID_PRUNER = {"name": "none", "options": {}}

_BARE_STRING = re.compile(r"[A-Za-z_][A-Za-z0-9_\-./]*")
_KEYWORDS = {"true", "false", "null", "inf", "nan"}


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One Optuna search parameter on a config path (or a config group, categorical only)."""

    path: str
    type: str  # float | int | categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.type == "categorical":
            return optuna.distributions.CategoricalDistribution(self.choices)
        if self.type == "int":
            return optuna.distributions.IntDistribution(
                self.low, self.high, log=self.log, step=self.step or 1
            )
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)


# one grid axis: (axis name, ((label, overrides of that label), ...))
GridAxis = tuple[str, tuple[tuple[str, tuple[str, ...]], ...]]


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A validated sweep file; stored in the study (`to_dict`) so every worker runs the same sweep."""

    name: str
    path: str
    experiment: str
    overrides: tuple[str, ...]
    metric: str
    direction: str
    seeds: tuple[int, ...]
    mode: str  # search | grid
    n_trials: int | None
    params: tuple[ParamSpec, ...]
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    grid: tuple[GridAxis, ...]
    storage: str | None
    workers: int
    heartbeat_s: float
    timeout_s: float
    max_retries: int
    launcher: dict[str, Any]

    @property
    def budget(self) -> int:
        """Trials the sweep runs in all: every grid point once per seed, or `n_trials`."""
        if self.mode == "search":
            return self.n_trials
        n_points = 1
        for _, labels in self.grid:
            n_points *= len(labels)
        return n_points * len(self.seeds)

    def grid_points(self) -> list[dict[str, str]]:
        """Every combination of axis labels, first axis slowest, in the file's order; none for a search."""
        if self.mode == "search":
            return []
        names = [axis for axis, _ in self.grid]
        labels = [[label for label, _ in options] for _, options in self.grid]
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*labels)]

    def trial_overrides(self, params: dict[str, Any], seed: int) -> list[str]:
        """The full Hydra override list of one trial.

        `params`: axis name -> label (grid) or config path -> value (search), without the seed."""
        expected = [axis for axis, _ in self.grid] if self.mode == "grid" else [p.path for p in self.params]
        if sorted(params) != sorted(expected) or seed not in self.seeds:
            raise SweepError(
                f"{self.path}: trial params {sorted(params)} seed {seed}: expected params {sorted(expected)} "
                f"and a seed in {list(self.seeds)}"
            )
        out = list(self.overrides)
        for axis, options in self.grid:
            bundles = dict(options)
            if params[axis] not in bundles:
                raise SweepError(
                    f"{self.path}: grid.{axis}: no label {params[axis]!r} (labels: {list(bundles)})"
                )
            out += bundles[params[axis]]
        out += [f"{p.path}={_render(params[p.path])}" for p in self.params]
        return [*out, f"seed={seed}"]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepSpec:
        d = dict(data)
        d["overrides"] = tuple(d["overrides"])
        d["seeds"] = tuple(d["seeds"])
        d["params"] = tuple(ParamSpec(**{**p, "choices": tuple(p["choices"])}) for p in d["params"])
        d["grid"] = tuple(
            (axis, tuple((label, tuple(bundle)) for label, bundle in options)) for axis, options in d["grid"]
        )
        return cls(**d)

    def make_sampler(self, seed: int | None) -> optuna.samplers.BaseSampler:
        """The study's sampler. Give each worker its own seed (so TPE's random start-up points differ);
        qmc with `scramble: true` is the exception: all its workers need the same seed."""
        cls, defaults = SAMPLERS[self.sampler["name"]]
        return _construct(cls, {**defaults, **self.sampler["options"], "seed": seed})

    def make_pruner(self) -> optuna.pruners.BasePruner:
        return _construct(PRUNERS[self.pruner["name"]], self.pruner["options"])


def _construct(cls: type, kwargs: dict[str, Any]) -> Any:
    # the user chose an experimental sampler/pruner by name in the sweep file: the warning is only noise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(**kwargs)


def trial_key(sweep_name: str, params: dict[str, Any], seed: int) -> str:
    """Filesystem-safe id of a trial's params + seed: a retried trial finds its own run dir and wandb id."""
    blob = json.dumps({"sweep": sweep_name, "params": params, "seed": seed}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _render(value: Any) -> str:
    """`value` in Hydra's override grammar; ValueError if Hydra would read it back as something else."""
    if value is None or isinstance(value, bool):
        text = json.dumps(value)
    elif isinstance(value, int | float):
        text = repr(value)
    elif isinstance(value, str):
        bare = _BARE_STRING.fullmatch(value) and value.lower() not in _KEYWORDS
        text = value if bare else "'" + value.replace("'", "\\'") + "'"
    elif isinstance(value, list):
        text = "[" + ",".join(_render(v) for v in value) + "]"
    else:
        raise ValueError(f"{value!r} is not a scalar or a list of scalars")
    parsed = OverridesParser.create().parse_overrides([f"x={text}"])[0].value()
    if parsed != value or type(parsed) is not type(value):
        raise ValueError(
            f"{value!r} does not survive Hydra's override grammar (it reads {text} as {parsed!r})"
        )
    return text
