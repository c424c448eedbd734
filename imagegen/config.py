"""Config dataclasses <-> dicts, TOML files and `--set a.b=c` overrides.

Each config dataclass lives next to the code it configures (TrainConfig in train.py, DataConfig in
data/registry.py, each family's Config in its own file). This module only converts and checks:
unknown keys and values of the wrong type are ConfigErrors that name the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError


def cache_path(*parts: str) -> Path:
    """A folder under imagegen's cache: $IMAGEGEN_CACHE, default ~/.cache/imagegen (evaluators, the
    scenes judge, caption embeddings)."""
    return Path(os.environ.get("IMAGEGEN_CACHE") or Path.home() / ".cache" / "imagegen").joinpath(*parts)


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
    return validate(cls(**kwargs), where)


# --- documented ranges ----------------------------------------------------------------------------------

MAX_SEED = 2**63 - 1          # torch.Generator.manual_seed takes any 64-bit value; 63 bits stay positive
MAX_COUNT = 10**9             # steps, intervals and other counts: larger is a typo, not a plan
MAX_BATCH = 65_536
MAX_IMAGE_SIZE = 1024         # image side in pixels: 1024^2 RGB is 12 MB per float image, already a lot here
MAX_WIDTH = 1024              # model.width: channels of a network's first layer (deeper layers double it)
MAX_WEIGHT = 1e6              # loss weights and similar non-negative factors


@dataclasses.dataclass(frozen=True)
class Range:
    """The documented range of a numeric value: [lo, hi] (ends excluded where lo_open / hi_open), plus
    the value 0 when `zero` says what 0 means ("all", "off", "the source's own"...).

    Config fields carry one in their metadata (`ranged`), CLI options use one as their argparse type, and
    every value is checked against it before anything is built or allocated."""

    lo: float
    hi: float
    kind: type = int
    lo_open: bool = False
    hi_open: bool = False
    zero: str | None = None

    def __str__(self) -> str:
        if self.kind is int:
            core = f"{int(self.lo)}..{int(self.hi)}"
        else:
            core = f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        return f"0 ({self.zero}) or {core}" if self.zero else core

    def phrase(self) -> str:
        """'in 1..64', or '0 (all) or 1..64': what a value must be."""
        return str(self) if self.zero else f"in {self}"

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.zero and value == 0:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def check(self, value: Any, key: str = "") -> Any:
        """`value`, or a ConfigError naming key, value and range."""
        if value not in self:
            raise ConfigError(f"{key}{' ' if key else ''}must be {self.phrase()}, got {value!r}")
        return value

    def bounds(self) -> dict:
        """The range as pydantic Field bounds (ge or gt, le or lt), for request bodies that share it."""
        if self.zero:
            raise ValueError("a range with a special 0 has no Field bounds")
        lo, hi = (self.kind(v) for v in (self.lo, self.hi))
        return {"gt" if self.lo_open else "ge": lo, "lt" if self.hi_open else "le": hi}

    def parse(self, text: str, key: str = "") -> int | float:
        """A CLI string -> a checked number (ConfigError naming key, text and range otherwise)."""
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            value = None
        if value is None or value not in self:
            what = "" if value is not None else "an integer, " if self.kind is int else "a number, "
            raise ConfigError(f"{key}{' ' if key else ''}must be {what}{self.phrase()}, got {text}")
        return value


def ranged(default: int | float, lo: float | Range, hi: float | None = None, **kw) -> Any:
    """A dataclass field with a documented Range: `ranged(20, 1, 1000)` (its kind from the default's
    type), or `ranged(20, STEPS)` with a Range that a CLI option shares."""
    rng = lo if isinstance(lo, Range) else Range(lo, hi, kind=type(default), **kw)
    return dataclasses.field(default=default, metadata={"range": rng})


def field_ranges(cls: type) -> dict[str, Range]:
    """{field name: Range} of a config dataclass."""
    return {f.name: f.metadata["range"] for f in dataclasses.fields(cls) if "range" in f.metadata}


def validate(obj: Any, where: str = "") -> Any:
    """Check every ranged field of a config dataclass, then run its own `validate()` (the checks that
    involve several fields), where it has one; returns obj. `where` names the section in messages."""
    prefix = f"{where}." if where else f"{type(obj).__name__}."
    for name, rng in field_ranges(type(obj)).items():
        rng.check(getattr(obj, name), prefix + name)
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
