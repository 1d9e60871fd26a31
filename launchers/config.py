"""Compose and validate experiment configs from the Hydra root `experiments/`.

Every mistake a person can make on the command line is caught here, before anything is written:
unknown experiment, unknown group option, unknown key (with the valid keys near it), bad values.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from core.train.families import check_config


class ConfigError(ValueError):
    """A bad experiment name, override or config value; the CLI exits 2 with this message."""


_MISSING = object()


def _has_key(cfg: DictConfig, key: str) -> bool:
    """Whether `key` exists, also when its value is still missing (`???`, e.g. data.root of a loader)."""
    parent_key, _, last = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, default=_MISSING) if parent_key else cfg
    return isinstance(parent, DictConfig) and last in parent.keys()  # noqa: SIM118 (`in` skips ??? values)


def _is_missing(cfg: DictConfig, key: str) -> bool:
    parent_key, _, last = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    return isinstance(parent, DictConfig) and OmegaConf.is_missing(parent, last)


def config_dir() -> Path:
    env = os.environ.get("ABLATE_CONFIG_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "experiments"


def group_options(group: str) -> list[str]:
    folder = config_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def config_groups() -> list[str]:
    root = config_dir()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir() and any(p.glob("*.yaml")))


def flat_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items_ex(resolve=False):
        path = f"{prefix}{k}"
        keys.append(path)
        if isinstance(v, DictConfig):
            keys.extend(flat_keys(v, path + "."))
    return keys


def keys_near(key: str, keys: list[str]) -> str:
    parent = key.rpartition(".")[0]
    siblings = [k for k in keys if k.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(key, keys, n=5, cutoff=0.6)
    near = list(dict.fromkeys(close + siblings))[:12]
    return ", ".join(near) if near else ", ".join(k for k in keys if "." not in k)


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.4)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"{hint} Available: {', '.join(options)}"


def _compose(overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _compose_or_explain(name: str, overrides: list[str]) -> DictConfig:
    """Experiment `name` with `overrides`, resolved; Hydra's and OmegaConf's complaints as ConfigError
    (ValueError: Hydra's own type checks of an override, e.g. a number given for a config group)."""
    try:
        cfg = _compose([f"experiment={name}", *overrides])
        cfg.experiment_name = name
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(f"experiment '{name}' with {overrides}: {exc}") from exc
    return cfg


def compose_experiment(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Resolved config of experiment `name` with Hydra-grammar `overrides`; ConfigError if anything is off."""
    overrides = list(overrides or [])
    experiments = group_options("experiment")
    if name not in experiments:
        raise ConfigError(f"unknown experiment '{name}'.{_suggest(name, experiments)}")
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(f"cannot parse overrides {overrides}: {exc}") from exc
    groups = config_groups()
    value_overrides = []
    for ov in parsed:
        key = ov.get_key_element()
        if ov.key_or_group in groups:
            options = group_options(ov.key_or_group)
            value = ov.value()
            for choice in value if isinstance(value, list) else [value]:
                if choice is None and ov.is_delete():
                    continue
                if not isinstance(choice, str) or choice not in options:
                    raise ConfigError(
                        f"'{ov.input_line}': no such option in group '{ov.key_or_group}'."
                        f"{_suggest(str(choice), options)}"
                    )
        elif not key.startswith("+"):
            value_overrides.append(ov)
    base = _compose_or_explain(name, [o.input_line for o in parsed if o not in value_overrides])
    keys = flat_keys(base)
    for ov in value_overrides:
        key = ov.key_or_group
        if not _has_key(base, key):
            groups_hint = (
                f" Config groups: {', '.join(groups)}."
                if "/" in key or key in {g.split("/")[0] for g in groups}
                else ""
            )
            raise ConfigError(
                f"'{ov.input_line}': no key '{key}' in experiment '{name}'. "
                f"Valid keys near it: {keys_near(key, keys)}.{groups_hint}"
            )
    cfg = _compose_or_explain(name, overrides)
    for ov in parsed:
        if ov in value_overrides:
            _check_type(ov, base, cfg)
        elif ov.key_or_group not in groups and ov.get_key_element().startswith("+"):
            _check_appended(ov)
    _check_required(cfg)
    _check_trainer_keys(cfg)
    if not (isinstance(cfg.seed, int) and not isinstance(cfg.seed, bool) and 0 <= cfg.seed < 2**32):
        raise ConfigError(f"seed must be an integer in [0, 2**32), got {cfg.seed!r}")
    try:
        check_config(cfg)
    except (ValueError, TypeError) as exc:  # TypeError: e.g. a number set to null
        raise ConfigError(f"experiment '{name}': {exc}") from exc
    except OmegaConfBaseException as exc:  # a key the family reads was deleted (~key)
        raise ConfigError(
            f"experiment '{name}': {exc.full_key} is needed ({str(exc).splitlines()[0]})"
        ) from exc
    return cfg


def _kind(value: object) -> str | None:
    """What a config value is, as the type check compares it; None: anything may replace it."""
    if value is None or (isinstance(value, str) and value == "???"):
        return None
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, ListConfig | list):
        return "a list"
    if isinstance(value, DictConfig | dict):
        return "a config section"
    return "a string"


def _check_type(ov: Override, base: DictConfig, cfg: DictConfig) -> None:
    """An override keeps the type of the value it replaces (null is always allowed): `seed=abc` is caught
    here, naming the key, not as a ValueError deep inside a run. Numbers must be finite."""
    key = ov.key_or_group
    try:
        old = OmegaConf.select(base, key, throw_on_missing=False)
    except OmegaConfBaseException:  # an interpolation of the base that only the overrides make resolvable
        return
    new = OmegaConf.select(cfg, key)
    want, got = _kind(old), _kind(new)
    if want is None or got is None or want == got:
        ok = True
    elif want == "a number":
        ok = got == "an integer"
    elif want == "a string":
        ok = got in ("an integer", "a number", "true or false")
    else:
        ok = False
    if ok and got in ("a number", "an integer") and not math.isfinite(new) and new != old:
        ok, want = False, "a finite number"
    if not ok:
        raise ConfigError(f"'{ov.input_line}': {key} must be {want} (default: {old!r}), got {new!r}")


@functools.cache
def _shipped_keys() -> frozenset[str]:
    """Every config path some shipped config file sets (at its package: `data/features.yaml` -> data.*,
    `# @package _global_` -> top level): the schema an appended `+key=value` is checked against."""
    keys = set()
    root = config_dir()
    for path in root.rglob("*.yaml"):
        text = path.read_text()
        group = str(path.parent.relative_to(root)).replace(os.sep, ".")
        prefix = "" if "@package _global_" in text or group == "." else group + "."
        node = OmegaConf.load(path)
        if isinstance(node, DictConfig):
            keys.update(prefix + k for k in flat_keys(node) if k.split(".")[0] != "defaults")
    return frozenset(keys)


def _trainer_keys() -> set[str]:
    """What `trainer_config` passes on to the trainer: TrainerConfig's fields it does not set itself, and
    the two keys it consumes (device, num_threads)."""
    from core.train.loop import TrainerConfig  # torch: only once a config is checked

    return {f.name for f in dataclasses.fields(TrainerConfig)} - {"seed", "best"} | {"device", "num_threads"}


def _check_appended(ov: Override) -> None:
    """`+key=value` adds a key no config has: only a key that its consumer reads is accepted (a trainer
    field, or a key some shipped config of that section sets), so a typo is not silently ignored."""
    key = ov.key_or_group
    if key.startswith("trainer."):
        return  # _check_trainer_keys names the trainer's own fields
    known = _shipped_keys()
    if key not in known:
        raise ConfigError(
            f"'{ov.input_line}': nothing reads '{key}' (no shipped config sets it). "
            f"Keys near it: {keys_near(key, sorted(known))}"
        )


def _check_required(cfg: DictConfig) -> None:
    missing = [k for k in flat_keys(cfg) if _is_missing(cfg, k)]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ConfigError(f"{', '.join(missing)} {verb} required: set {missing[0]}=...")


def _check_trainer_keys(cfg: DictConfig) -> None:
    accepted = _trainer_keys()
    unknown = sorted(set(map(str, cfg.trainer)) - accepted)
    if unknown:
        raise ConfigError(
            f"trainer.{unknown[0]}: not a trainer setting. The trainer accepts: "
            + ", ".join(f"trainer.{k}" for k in sorted(accepted))
        )
