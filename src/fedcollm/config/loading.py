"""A TOML file, with --set overrides, into a checked Config."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from fedcollm.config.checks import check_meaning
from fedcollm.config.parse import build
from fedcollm.config.schema import Config, ConfigError


def config_from_dict(values: dict[str, Any]) -> Config:
    config = build(Config, values)
    check_meaning(config)
    return config


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value); the value is read as TOML, else as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set client.lr=1e-4")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        table = values
        for part in path[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is a value, not a table")
        table[path[-1]] = value
    return values


def load_config(
    path: str | Path, overrides: list[str] | None = None, data_dir: str | None = None
) -> Config:
    """Read, override and validate a TOML config; raises ConfigError on any problem."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give the TOML file in it")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; see configs/ for examples")
    try:
        # utf-8-sig: a byte-order mark, which some editors write, is not part of the TOML.
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {err.start}); save the file as UTF-8"
        ) from None
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    values = apply_overrides(values, overrides or [])
    if data_dir is not None:
        values["data_dir"] = data_dir
    task = values.get("task")
    if isinstance(task, str) and task.endswith((".yaml", ".yml")):
        # Ray workers and resumed runs may start elsewhere: the task file's absolute path.
        values["task"] = str(Path(task).expanduser().resolve())
    return config_from_dict(values)
