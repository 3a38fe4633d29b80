"""TOML values into the tables of schema.py: each value checked against its field's type,
each unknown key refused with the keys allowed in its place."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal

from fedcollm.config.schema import ConfigError


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(v) for v in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {typing.get_args(tp)[0].__name__}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, str(tp)
    )


def _convert(key: str, value: Any, tp: Any) -> Any:
    """Check one value against its field type; return it in that type."""
    origin = typing.get_origin(tp)
    wrong = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {_type_name(tp)}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list) or not all(isinstance(v, item) for v in value):
            raise wrong
        return list(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong
        if not math.isfinite(value):  # TOML has nan and inf; no setting means either
            raise ConfigError(f"{key}: must be a finite number, got {value}")
        return float(value)
    if tp is int and isinstance(value, bool):
        raise wrong
    if not isinstance(value, tp):
        raise wrong
    return value


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = prefix + name
        if name not in fields:
            allowed = ", ".join(prefix + f for f in fields)
            raise ConfigError(f"unknown key '{key}'; allowed here: {allowed}")
        tp = hints[name]
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(item):  # [[table]]: each a table, inheriting keys
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError(f"{key}: expected tables [[{key}]], got {value!r}")
            inherited = {k: values[k] for k in item.INHERITED if k in values}
            kwargs[name] = [
                build(item, {**inherited, **v}, f"{key}[{i}].") for i, v in enumerate(value)
            ]
        elif dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a table [{key}], got {value!r}")
            kwargs[name] = build(tp, value, key + ".")
        elif "registry" in fields[name].metadata:  # a name of a registered member
            registry = fields[name].metadata["registry"]
            if not isinstance(value, str) or value not in registry:
                raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {registry}")
            kwargs[name] = value
        else:
            kwargs[name] = _convert(key, value, tp)
    return cls(**kwargs)
