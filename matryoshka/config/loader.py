"""Load typed dataclass configs from presets, YAML files and ``dotted.key=value`` overrides.

Resolution order in :func:`load_config`::

    class defaults  <-  preset / YAML file (deep-merged over its ``preset:``)  <-  overrides

Every error is a :class:`ConfigError` whose message names the offending key by its full
dotted path. Config dataclasses must be defined at module level (their string annotations
are resolved with :func:`typing.get_type_hints`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError, short
from .overrides import apply_overrides, deep_merge
from .schema import fields, from_dict, to_dict
from .yaml_io import load_yaml

T = TypeVar("T")
PRESET_KEY = "preset"
PresetMap = Mapping[str, Mapping[str, Any] | Callable[[], Any]]


def _preset_data(name: str, presets: PresetMap) -> dict[str, Any]:
    value = presets[name]
    if callable(value):
        value = value()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if not isinstance(value, Mapping):
        raise TypeError(f"preset {name!r} must be a mapping (or return one), got {type(value).__name__}")
    return copy.deepcopy(dict(value))


def _unknown_preset(name: str, presets: PresetMap, context: str = "") -> ConfigError:
    names = sorted(presets)
    match = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean '{match[0]}'? " if match else ""
    available = ", ".join(names) if names else "none"
    return ConfigError(
        f"unknown preset '{name}'{context} and no such config file ({hint}available presets: {available})",
        PRESET_KEY if context else None,
    )


def _looks_like_file(source: str) -> bool:
    return source.endswith((".yaml", ".yml")) or "/" in source or os.sep in source


def _resolve(
    source: str | os.PathLike,
    presets: PresetMap,
    use_preset_key: bool,
    base_dir: Path | None,
    seen: tuple[str, ...],
    context: str = "",
) -> dict[str, Any]:
    """Data of a preset name or YAML file, with its own ``preset:`` base merged in."""
    if isinstance(source, str) and source in presets:
        ident, data, here = f"preset {source!r}", _preset_data(source, presets), base_dir
    else:
        file = Path(source).expanduser()
        if base_dir is not None and not file.is_absolute():
            file = base_dir / file
        if not file.is_file() and isinstance(source, str) and not _looks_like_file(source):
            raise _unknown_preset(source, presets, context)
        ident, data, here = f"file {str(file.resolve())!r}", load_yaml(file), file.parent
    return _expand(data, ident, presets, use_preset_key, here, seen)


def _expand(
    data: dict[str, Any],
    ident: str,
    presets: PresetMap,
    use_preset_key: bool,
    here: Path | None,
    seen: tuple[str, ...],
) -> dict[str, Any]:
    if ident in seen:
        raise ConfigError(f"preset cycle: {' -> '.join(seen + (ident,))}", PRESET_KEY)
    if use_preset_key and PRESET_KEY in data:
        base = data.pop(PRESET_KEY)
        if not isinstance(base, str):
            raise ConfigError(f"'{PRESET_KEY}' in {ident} must be a preset name or file, got {short(base)}", PRESET_KEY)
        base_data = _resolve(base, presets, use_preset_key, here, seen + (ident,), f" (named by {ident})")
        data = deep_merge(base_data, data)
    return data


def load_config(
    cls: type[T],
    source: str | os.PathLike | Mapping[str, Any] | None = None,
    overrides: Iterable[str] = (),
    presets: PresetMap | None = None,
    upgrade: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> T:
    """Build config ``cls`` from defaults, a preset or YAML file, and overrides.

    ``source`` is ``None`` (class defaults), a preset name (a key of ``presets``, whose value
    is a dict, a dataclass, or a callable returning either), a path to a YAML file, or a
    mapping. A file (or preset) may start from another with a top-level ``preset: NAME`` key
    (a preset name or a YAML path relative to the file); its own keys are deep-merged over
    that base. ``upgrade`` rewrites the keys of configs saved by older versions before the
    ``overrides``, which are applied last.
    """
    presets = presets if presets is not None else {}
    use_preset_key = PRESET_KEY not in fields(cls)
    if source is None:
        data: dict[str, Any] = {}
    elif dataclasses.is_dataclass(source) and not isinstance(source, type):
        data = to_dict(source)
    elif isinstance(source, Mapping):
        data = _expand(copy.deepcopy(dict(source)), "the given mapping", presets, use_preset_key, None, ())
    else:
        data = _resolve(source, presets, use_preset_key, None, ())
    if upgrade is not None:
        data = upgrade(data)
    return from_dict(cls, apply_overrides(data, overrides, cls))
