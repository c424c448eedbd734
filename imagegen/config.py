"""Config dataclasses <-> dicts, TOML files and `--set a.b=c` overrides.

Each config dataclass lives next to the code it configures (TrainConfig in train.py, DataConfig in
data/registry.py, each family's Config in its own file). This module only converts and checks:
unknown keys and values of the wrong type are ConfigErrors that name the key.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError


def to_dict(cfg: Any) -> dict:
    """A dataclass as a JSON-serialisable dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _check_value(value: Any, tp: Any, where: str) -> Any:
    """Return `value` converted to the annotated type `tp`, or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_check_value(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp}")


def from_dict(cls: type, data: dict | None, where: str = "") -> Any:
    """Build dataclass `cls` from `data`, which holds only overrides of the defaults.

    Unknown keys and wrongly typed values raise ConfigError naming the dotted key.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]} (known keys of {where or cls.__name__}: "
            f"{', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _check_value(value, hints[name], key)
    return validate(cls(**kwargs))


def validate(obj: Any) -> Any:
    """Run the dataclass's own `validate()` range checks, where it has one; returns obj."""
    check = getattr(obj, "validate", None)
    if callable(check):
        check()
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"model.width=48"` -> (["model", "width"], 48). Values are read as TOML, else as a bare string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply `--set a.b=c` strings to a nested dict of overrides (in place), returning it."""
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return tree


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def check_positive(obj: Any, *names: str, allow_zero: bool = False) -> None:
    """Raise ConfigError unless each named numeric field is > 0 (or >= 0 with allow_zero)."""
    for name in names:
        value = getattr(obj, name)
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"{type(obj).__name__}.{name} must be {bound}, got {value!r}")
