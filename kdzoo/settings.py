"""Typed hyperparameters: dataclass defaults, then a TOML file, then ``--set key=value``.

Every method (and the run itself) describes its knobs as a dataclass. Overrides arrive as
strings from the command line or as TOML values; this module checks each key exists and
coerces each value to the field's declared type, so a typo fails before training starts
instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from .errors import UserError, close_matches, missing


def parse_assignments(pairs: list[str] | None) -> dict[str, str]:
    """``["a=1", "b=x"]`` → ``{"a": "1", "b": "x"}``."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects key=value, got {pair!r}; write e.g. --set temperature=4")
        out[key.strip()] = value.strip()
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{missing('config file', path)}; pass an existing TOML file to --config")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {str(path)!r} is not valid TOML ({e}); fix the syntax") from None


def _coerce(value: Any, annotation: Any, key: str, owner: str) -> Any:
    """Turn ``value`` (a CLI string or a TOML value) into ``annotation``'s type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, owner)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{owner}: bad value for {key!r}")
    if origin is typing.Literal:
        if isinstance(value, str) and value not in args:
            # a number literal given as a string
            for a in args:
                if str(a) == value:
                    return a
        if value not in args:
            raise UserError(f"{owner}: {key} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        item_type = args[0] if args else str
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{owner}: {key} expects a list, got {value!r}")
        items = [_coerce(v, item_type, key, owner) for v in value]
        return tuple(items) if origin is tuple else items
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"{owner}: {key} expects true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise UserError(f"{owner}: {key} expects a {annotation.__name__}, got {value!r}")
        try:
            if annotation is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                return int(value) if not isinstance(value, str) else int(value, 10)
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{owner}: {key} expects a {annotation.__name__}, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, str):
            raise UserError(f"{owner}: {key} expects a string, got {value!r}")
        return value
    return value


def apply_overrides(config: Any, overrides: dict[str, Any], owner: str, finite: bool = True) -> Any:
    """A copy of dataclass ``config`` with ``overrides`` applied, each checked and typed.

    With ``finite`` (the default) a float that is NaN or infinite is refused too: no
    hyperparameter means anything at ``inf``, and a NaN weight only shows up as a NaN loss
    many steps later. ``RunConfig`` passes False: its ``validate`` checks ranges as well and
    names the command-line flags.
    """
    hints = typing.get_type_hints(type(config))
    names = [f.name for f in dataclasses.fields(config)]
    changes = {}
    for key, value in overrides.items():
        if key not in names:
            valid = ", ".join(names) if names else "(none)"
            raise UserError(
                f"{owner} has no setting {key!r}.{close_matches(key, names)} Valid settings: {valid}"
            )
        changes[key] = _coerce(value, hints[key], key, owner)
        if finite:
            _require_finite(changes[key], key, owner)
    return dataclasses.replace(config, **changes)


def _require_finite(value: Any, key: str, owner: str) -> None:
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if isinstance(item, float) and not math.isfinite(item):
            raise UserError(f"{owner}: {key} must be a finite number, got {item}; give it a finite value")


def describe(config_cls: type) -> list[tuple[str, str, Any]]:
    """(name, type, default) for every field: used by `kdzoo list methods` and the docs."""
    hints = typing.get_type_hints(config_cls)
    rows = []
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        t = hints[f.name]
        rows.append((f.name, getattr(t, "__name__", str(t)), default))
    return rows
