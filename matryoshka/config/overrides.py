"""``dotted.key=value`` overrides and deep merging of plain config data."""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Iterable, Mapping
from pathlib import PurePath
from typing import Any, Literal

import yaml

from .errors import ConfigError, join, short
from .schema import child_type, fields, is_dataclass_type, kind, strip_optional, to_dict
from .yaml_io import parse_yaml


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict: ``override`` merged into ``base``; nested mappings merge, anything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _stringish(tp: Any) -> tuple[bool, bool]:
    """(whether ``tp`` only takes strings, whether it takes None)."""
    inner, optional = strip_optional(tp)
    if inner is str or (isinstance(inner, type) and issubclass(inner, PurePath)):
        return True, optional
    if typing.get_origin(inner) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(inner)), optional
    return False, optional


def _parse_value(raw: str, tp: Any, key: str) -> Any:
    text = raw.strip()
    stringish, optional = _stringish(tp)
    try:
        value = parse_yaml(text)
    except yaml.YAMLError as err:
        if stringish:
            return text
        problem = getattr(err, "problem", None) or err
        raise ConfigError(f"cannot parse the value of override '{key}': {text!r} ({problem})", key) from err
    if stringish and not isinstance(value, str) and not (value is None and optional):
        return text  # `name=yes`, `tag=1.0`, `path=~` stay strings for string fields
    return value


def _default_section(cls: Any, name: str, child: Any) -> Any:
    """A fresh plain copy of field ``name``'s default, to set one key inside it."""
    cls, _ = strip_optional(cls)
    if is_dataclass_type(cls):
        spec = fields(cls)[name][1]
        if spec.default_factory is not dataclasses.MISSING:
            return to_dict({"value": spec.default_factory()})["value"]
        if spec.default is not dataclasses.MISSING and spec.default is not None:
            return to_dict({"value": spec.default})["value"]
    return [] if kind(strip_optional(child)[0]) in ("list", "tuple") else {}


def _section(value: Any) -> Any:
    """A mutable mapping/list view of an existing value, or the value unchanged."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping) and not isinstance(value, dict):
        return dict(value)
    return value


def _dict_key(tp: Any, segment: str, node: Mapping) -> Any:
    """The key ``segment`` addresses in a mapping (``'64'`` -> ``64`` when the keys are ints)."""
    if segment in node:
        return segment
    inner, _ = strip_optional(tp)
    if kind(inner) == "dict" and typing.get_args(inner)[:1] == (int,) and segment.lstrip("-").isdigit():
        return int(segment)
    return segment


def _apply_one(data: dict[str, Any], segments: list[str], value: Any, cls: type) -> None:
    node: Any = data
    tp: Any = cls
    path = ""
    for depth, segment in enumerate(segments):
        last = depth == len(segments) - 1
        child_tp = child_type(tp, segment, path, ".".join(segments))
        sub = join(path, segment)
        if isinstance(node, list):
            index = int(segment)
            if index >= len(node):
                raise ConfigError(f"override index out of range: '{sub}' ('{path}' has {len(node)} items)", sub)
            if last:
                node[index] = value
                return
            node[index] = child = _section(node[index])
        elif isinstance(node, dict):
            key = _dict_key(tp, segment, node)
            if last:
                node[key] = value
                return
            child = _section(node.get(key))
            if child is None:
                child = _default_section(tp, segment, child_tp)
            node[key] = child
        else:
            raise ConfigError(f"cannot set '{'.'.join(segments)}': '{path}' holds {short(node)}, not a section", path)
        node, tp, path = child, child_tp, sub


def _leaf_type(cls: type, segments: list[str]) -> Any:
    tp: Any = cls
    path = ""
    for segment in segments:
        tp = child_type(tp, segment, path, ".".join(segments))
        path = join(path, segment)
    return tp


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str], cls: type) -> dict[str, Any]:
    """A copy of ``data`` with ``dotted.key=value`` overrides applied.

    Values are parsed as YAML (``[32, 64]``, ``{a: 1}``, ``1e-4``, ``~/pics``); for string
    fields a value YAML would read as another type stays a string. Keys are checked against
    ``cls`` before anything is applied; integer segments index lists (``stages.1.steps=5``).
    Setting a key replaces its whole value.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"invalid override {item!r}: expected 'dotted.key=value'")
        segments = [segment.strip() for segment in key.strip().split(".")]
        if not all(segments):
            raise ConfigError(f"invalid override {item!r}: empty key segment in {key.strip()!r}")
        parsed.append((segments, _parse_value(raw, _leaf_type(cls, segments), ".".join(segments))))
    out = copy.deepcopy(dict(data))
    for segments, value in parsed:
        _apply_one(out, segments, value, cls)
    return out
