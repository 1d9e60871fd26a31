"""Compose and validate experiment configs from the Hydra root `experiments/`.

Every mistake a person can make on the command line is caught here, before anything is written:
unknown experiment, unknown group option, unknown key (with the valid keys near it), bad values.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
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
            if isinstance(value, str) and value not in options:
                raise ConfigError(
                    f"'{key}={value}': no such option in group '{ov.key_or_group}'.{_suggest(value, options)}"
                )
        elif not key.startswith("+"):
            value_overrides.append(ov)
    base = _compose([f"experiment={name}", *[o.input_line for o in parsed if o not in value_overrides]])
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
    try:
        cfg = _compose([f"experiment={name}", *overrides])
        cfg.experiment_name = name
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"experiment '{name}' with {overrides}: {exc}") from exc
    try:
        check_config(cfg)
    except ValueError as exc:
        raise ConfigError(f"experiment '{name}': {exc}") from exc
    return cfg
