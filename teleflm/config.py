"""Typed configuration from TOML, for every config of the project: one reader (`read_toml`, and
`read_raw` with `--set section.key=value` overrides) and one builder (`build`) that makes a dataclass of
a table, refusing unknown keys, wrong types and values out of range by name. A dataclass's `RANGES`
gives its numeric keys' ranges; a field typed `Annotated[dict, check]` is checked by `check(table,
where)` (the `[model]` table: teleflm.train.config), and `read_json` reads the project's JSON files."""

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints


@dataclass(frozen=True)
class Range:
    """The values a numeric key may take: `low` to `high` (each bound itself allowed unless open),
    or one of `also`."""

    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False
    also: tuple = ()

    def __contains__(self, value) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return (above and below) or value in self.also

    def __str__(self) -> str:
        low = f"> {self.low:g}" if self.open_low else f">= {self.low:g}"
        high = f"< {self.high:g}" if self.open_high else f"<= {self.high:g}"
        if math.isinf(self.high):
            text = low
        elif math.isinf(self.low):
            text = high
        else:
            text = f"{low} and {high}"
        return " or ".join([text, *map(str, self.also)])


POSITIVE = Range(0, open_low=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
FRACTION = Range(0, 1, open_high=True)  # in [0, 1)


class ConfigError(ValueError):
    """A config that cannot work; the message names the file and the key."""


def build(cls, raw: dict, where: str):
    """Build dataclass `cls` from a TOML table, refusing unknown or missing keys, wrong types and
    values out of range by name."""
    hints = get_type_hints(cls, include_extras=True)
    kwargs = check_table(raw, hints, getattr(cls, "RANGES", {}), where)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init
        and f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def check_table(raw, hints: dict[str, Any], ranges: dict[str, Range], where: str) -> dict:
    """The checked values of a TOML table whose keys have the types `hints` and the `ranges`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(hints)}")
    values = {}
    for key, value in raw.items():
        values[key] = value = _coerce(hints[key], value, f"{where}.{key}")
        if key in ranges and value not in ranges[key]:
            raise ConfigError(f"{where}.{key} = {value!r} is out of range: it must be {ranges[key]}")
    return values


def _coerce(hint, value, where: str):
    origin = get_origin(hint)
    if get_origin(hint) is Annotated:  # a table with a checker of its own (hint's metadata)
        return hint.__metadata__[0](value, where)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin is list:
        (item,) = get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        if origin is dict:  # dict[str, T]: each value a T
            _, item = get_args(hint)
            return {k: _coerce(item, v, f"{where}.{k}") for k, v in value.items()}
        return value
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(hint))}")
        return value
    if origin in (Union, UnionType):  # the first that fits; `None` is only a default (TOML has no null)
        options = [a for a in get_args(hint) if a is not type(None)]
        if len(options) == 1:
            return _coerce(options[0], value, where)
        for option in options:
            try:
                return _coerce(option, value, where)
            except ConfigError:
                pass
        names = " or ".join(getattr(o, "__name__", None) or str(o) for o in options)
        raise ConfigError(f"{where}: expected {names}, got {value!r}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string
    return key.strip().split("."), value


def read_toml(path: str | Path) -> dict:
    """A TOML file as tables; a missing file or a syntax error is named with the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def read_raw(path: str | Path, overrides: list[str] = ()) -> dict:
    """A TOML config as tables, with `section.key=value` overrides (values in TOML syntax) applied."""
    raw = read_toml(path)
    for text in overrides:
        keys, value = _parse_override(text)
        table = raw
        for k in keys[:-1]:
            table = table.setdefault(k, {})
        table[keys[-1]] = value
    return raw


def read_json(path: Path, error: type[Exception] = ValueError):
    """A JSON file's content; an unreadable or invalid file is `error` naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise error(f"{path}: cannot be read, not valid JSON ({e})") from None
