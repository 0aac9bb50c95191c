"""Typed reading of ml-mdm option values, which come as YAML scalars, strings or saved Python values.

ml-mdm's argument parser accepts lists as comma-separated strings, booleans as 0/1 and
"none" for unset numbers, and its saved ``args`` hold the parsed values; each parser
here accepts every such form and raises :class:`MlmdmConfigError` naming the option.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from .errors import MlmdmConfigError

__all__ = [
    "parse_bool",
    "parse_enum",
    "parse_float",
    "parse_int",
    "parse_ints",
    "parse_micro",
    "parse_ratios",
    "section_of",
    "with_defaults",
]


def _unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null"))


def parse_ints(value: Any, where: str) -> list[int]:
    """ml-mdm list options: a YAML list, one number, or a comma-separated string."""
    if value is None:
        return []
    if isinstance(value, bool):
        raise MlmdmConfigError(f"{where}: expected integers, got {value!r}")
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            return [int(p) for p in parts]
        except ValueError:
            raise MlmdmConfigError(f"{where}: expected comma-separated integers, got {value!r}") from None
    if isinstance(value, (list, tuple)):
        out = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (int, float)) or int(item) != item:
                raise MlmdmConfigError(f"{where}: expected integers, got {value!r}")
            out.append(int(item))
        return out
    raise MlmdmConfigError(f"{where}: expected integers, got {value!r}")


def parse_int(value: Any, where: str) -> int | None:
    """An integer (``2``, ``2.0``, ``"2"``); None when unset."""
    if _unset(value):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MlmdmConfigError(f"{where}: expected an integer, got {value!r}") from None
    if isinstance(value, bool) or not number.is_integer():
        raise MlmdmConfigError(f"{where}: expected an integer, got {value!r}")
    return int(number)


def parse_float(value: Any, where: str) -> float | None:
    """A number; None when unset."""
    if _unset(value):
        return None
    if isinstance(value, bool):
        raise MlmdmConfigError(f"{where}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise MlmdmConfigError(f"{where}: expected a number, got {value!r}") from None


def parse_bool(value: Any, where: str) -> bool:
    """A boolean, 0 / 1, or one of the strings true, false, 1, 0, yes, no."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise MlmdmConfigError(f"{where}: expected true or false, got {value!r}")


def parse_enum(value: Any, choices: Mapping[str, Any], where: str) -> str:
    """The upper-case member name of an ml-mdm enum, checked against ``choices``."""
    name = str(value).strip().upper() if value is not None else ""
    if name not in choices:
        raise MlmdmConfigError(f"{where}: {value!r} is not supported (supported: {', '.join(choices)})")
    return name


def parse_micro(value: Any, where: str) -> dict[str, float]:
    """``'scale:64'`` or ``'scale:64,watermark_score:0'`` -> ``{"scale": 64.0, ...}``."""
    if _unset(value):
        return {}
    out: dict[str, float] = {}
    for item in str(value).split(","):
        key, sep, default = item.partition(":")
        try:
            out[key.strip()] = float(default)
        except ValueError:
            raise MlmdmConfigError(f"{where}: expected 'NAME:DEFAULT[,NAME:DEFAULT]', got {value!r}") from None
        if not sep or not key.strip():
            raise MlmdmConfigError(f"{where}: expected 'NAME:DEFAULT[,NAME:DEFAULT]', got {value!r}")
    return out


def parse_ratios(value: Any, where: str) -> list[float] | None:
    """ml-mdm ``'a:b:c'`` strings; None when unset."""
    if _unset(value):
        return None
    try:
        return [float(x) for x in str(value).split(":")]
    except ValueError:
        raise MlmdmConfigError(f"{where}: expected numbers separated by ':', e.g. '2:1', got {value!r}") from None


def with_defaults(section: Any, defaults: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Fill ml-mdm defaults in; unknown keys are an error (they are not silently dropped)."""
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise MlmdmConfigError(f"{where} must be a mapping, got {type(section).__name__}")
    unknown = [key for key in section if key not in defaults]
    if unknown:
        hints = []
        for key in unknown:
            near = difflib.get_close_matches(str(key), list(defaults), n=1)
            hints.append(f"'{key}'" + (f" (did you mean '{near[0]}'?)" if near else ""))
        raise MlmdmConfigError(
            f"{where} has option{'s' if len(unknown) > 1 else ''} that ml-mdm does not define: {', '.join(hints)}"
        )
    return {**defaults, **section}


def section_of(raw: Mapping[str, Any], name: str) -> Any:
    """A top-level section of the config; an unset one reads as empty, as ml-mdm's defaults do."""
    value = raw.get(name)
    return {} if value is None else value
