"""Typed configs: dataclasses, filled from YAML files and dotted overrides.

    cfg = load_config(AEStageConfig, "configs/ae.yaml", ["train.steps=200", "model.latent_tokens=8"])

A key the dataclass does not have is an error that names it and lists the valid keys at
that level; values are type-checked by OmegaConf against the dataclass annotations.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, TypeVar

from omegaconf import OmegaConf

from .errors import ConfigError

T = TypeVar("T")


def _check_keys(cls: type, data: Any, where: str) -> None:
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return
    names = sorted(f.name for f in dataclasses.fields(cls))
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key not in names:
            level = f" under '{where[:-1]}'" if where else ""
            raise ConfigError(f"unknown config key '{where}{key}'; valid keys{level}: {', '.join(names)}")
        _check_keys(hints.get(key), value, f"{where}{key}.")


def load_config(cls: type[T], path: str | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from its defaults, then the YAML file at ``path``, then ``key=value``
    overrides (dotted keys, YAML values)."""
    layers = []
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML, e.g. configs/dit.yaml")
        file_cfg = OmegaConf.load(path)
        _check_keys(cls, OmegaConf.to_container(file_cfg), "")
        layers.append(file_cfg)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. train.steps=100)")
        dotted = OmegaConf.from_dotlist([item])
        _check_keys(cls, OmegaConf.to_container(dotted), "")
        layers.append(dotted)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), *layers)
        return OmegaConf.to_object(merged)
    except Exception as exc:  # OmegaConf's validation errors: wrong types, missing values
        raise ConfigError(f"config {path or ''} {overrides or ''}: {exc}".strip()) from exc


def load_config_section(cls: type[T], path: str, section: str) -> T:
    """One section of a saved stage config (e.g. ``model`` of ``RUN/dit/config.yaml``) as
    ``cls``: how library code reads what a stage resolved without importing the stage."""
    if not os.path.exists(path):
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML, e.g. configs/dit.yaml")
    data = OmegaConf.to_container(OmegaConf.load(path)).get(section, {})
    _check_keys(cls, data, f"{section}.")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), data))


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg, path: str) -> None:
    with open(path, "w") as f:
        f.write(to_yaml(cfg))
