"""Type checks for the dataclass configs, from their annotations: a config file can hold any JSON/YAML/TOML value,
and a wrong type must fail as one line naming the field, not deep inside the model."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal

from nanoseek.errors import ConfigError


def _matches(value: Any, kind: Any) -> bool:
    origin = typing.get_origin(kind)
    if origin is Literal:
        return any(value == option and type(value) is type(option) for option in typing.get_args(kind))
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if origin is tuple:  # tuple[X, ...]
        return isinstance(value, tuple) and all(_matches(item, typing.get_args(kind)[0]) for item in value)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:  # an integer is a fine float; NaN and infinity are not
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(kind, type):
        return isinstance(value, kind)
    return True


def _describe(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin is Literal:
        return "one of " + ", ".join(repr(option) for option in typing.get_args(kind))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(kind))
    if kind is type(None):
        return "null"
    if origin is tuple:
        return f"a list ({_describe(typing.get_args(kind)[0])} each)"
    return {float: "a finite number", int: "an integer", bool: "true or false", str: "a string"}.get(
        kind, getattr(kind, "__name__", str(kind))
    )


def check_field_types(config: Any, section: str, skip: tuple[str, ...] = ()) -> None:
    """ConfigError naming the first field whose value does not have its annotated type."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name not in skip and not _matches(value, hints[f.name]):
            raise ConfigError(f"{section} field {f.name!r}: must be {_describe(hints[f.name])}, got {value!r}")
