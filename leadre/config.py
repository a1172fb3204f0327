"""Typed configuration: one dataclass per stage (in ``<package>/config.py`` beside the
stage), filled from one section of a YAML file plus command-line overrides, and type-checked
on load so a typo fails before an hour of work, not during it.

    cfg = load_config(SidConfig, "configs/sids.yaml", section="sids", overrides=["levels=3"])

Every option that names another stage's artifact directory is spelled ``<stage>_dir``
(``ingest_dir``, ``sids_dir``, ``prompts_dir``, ``sft_dir``, ``model_dir`` for the output of
either training stage, ``index_dir``); the old spellings are refused with the new name.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


# Option names that earlier releases used -> today's name (dotted: a field of a nested
# section). Only an option the config class does not know is looked up here.
RENAMED: dict[str, str] = {
    "prompts": "prompts_dir", "sids": "sids_dir", "sft": "sft_dir", "input": "input_dir",
    # decoding and its pool moved into one `generation` section (GenerationConfig)
    **{k: f"generation.{k}" for k in ("beam_size", "top_k", "max_prompt_tokens", "batch_size",
                                      "device", "num_replicas", "num_cpus", "num_gpus")},
    "selection_beam": "generation.beam_size",
    "actors": "generation.num_replicas", "workers": "generation.num_replicas",
    "cpus_per_actor": "generation.num_cpus", "cpus_per_worker": "generation.num_cpus",
    "gpus_per_actor": "generation.num_gpus", "gpus_per_worker": "generation.num_gpus",
}


def _check(name: str, value: Any, tp: Any) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{name}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(name, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {value!r} matches none of {args}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (inner, *_) = get_args(tp) or (Any,)
        out = [_check(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, prefix=f"{name}.")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{name}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build a config dataclass from a mapping, rejecting unknown keys and wrong types."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    renamed = [u for u in unknown if RENAMED.get(u, "").split(".")[0] in fields]
    if renamed:
        raise ConfigError("; ".join(f"{cls.__name__}: option {prefix + u!r} is now called "
                                    f"{prefix + RENAMED[u]!r}" for u in renamed))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} option(s) {', '.join(prefix + u for u in unknown)};"
                          f" valid: {', '.join(sorted(fields))}")
    kwargs = {k: _check(prefix + k, v, hints[k]) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"generation.beam_size": 20}`` -> ``{"generation": {"beam_size": 20}}`` (dotted keys
    name fields of nested sections; the CLI, ``--set`` and Serve's ``args:`` all use them)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {p} is a value, not a section")
        node[leaf] = merge(node[leaf], value) if isinstance(node.get(leaf), dict) \
            and isinstance(value, dict) else value
    return out


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``key=value`` strings (values parsed as YAML, dotted keys nest) into a mapping."""
    flat: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        flat[key] = yaml.safe_load(raw) if raw != "" else None
    return nest(flat)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | Path | None = None, section: str | None = None,
                overrides: list[str] | dict[str, Any] | None = None) -> T:
    """Defaults <- ``section`` of the YAML at ``path`` <- overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
        if section is not None:
            data = data.get(section) or {}
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    return from_dict(cls, merge(data, extra))
