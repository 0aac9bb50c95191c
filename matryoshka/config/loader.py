"""Load typed dataclass configs from presets, YAML files and ``dotted.key=value`` overrides.

The loader works on any tree of dataclasses whose fields are annotated with
``str``/``int``/``float``/``bool``, ``Path``, ``Enum``, ``Literal[...]``,
``Optional[...]``/unions, ``list[...]``, ``tuple[...]``, ``dict[K, V]``, nested
dataclasses or ``Any``. String annotations (``from __future__ import annotations``)
are resolved with :func:`typing.get_type_hints`, so config dataclasses must be
defined at module level.

Resolution order in :func:`load_config`::

    class defaults  <-  preset / YAML file (deep-merged over its ``preset:``)  <-  overrides

Every error is a :class:`ConfigError` whose message names the offending key by
its full dotted path. :func:`to_dict` emits every init field, so a dumped config
loads back to an equal object without needing the presets that produced it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import functools
import numbers
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = [
    "ConfigError",
    "apply_overrides",
    "deep_merge",
    "dump_yaml",
    "from_dict",
    "load_config",
    "load_yaml",
    "to_dict",
]

T = TypeVar("T")
_NoneType = type(None)
PRESET_KEY = "preset"


class ConfigError(ValueError):
    """Invalid configuration; ``path`` is the dotted key at fault (``""`` for the root)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class _Mismatch(ConfigError):
    """A value of the wrong type at exactly ``path`` (lets unions report their own type)."""


# ----------------------------------------------------------------------------- helpers


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _where(path: str) -> str:
    return f"'{path}'" if path else "the config root"


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def type_name(tp: Any) -> str:
    """Human-readable name of an annotation, used in error messages."""
    if tp is Any:
        return "any value"
    if tp is _NoneType or tp is None:
        return "None"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is Union or origin is types.UnionType:
        return " or ".join(type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        if args:
            return f"{name}[{', '.join('...' if a is Ellipsis else type_name(a) for a in args)}]"
        return name
    return getattr(tp, "__name__", str(tp))


def _mismatch(value: object, tp: Any, path: str, detail: str = "") -> _Mismatch:
    where = f" for '{path}'" if path else ""
    extra = f" ({detail})" if detail else ""
    return _Mismatch(
        f"invalid value{where}: expected {type_name(tp)}, got {_short(value)} ({type(value).__name__}){extra}",
        path,
    )


def _unknown_key(path: str, key: object, valid: Iterable[str]) -> ConfigError:
    valid = list(valid)
    full = _join(path, key)
    match = difflib.get_close_matches(str(key), valid, n=1)
    if match:
        hint = f"did you mean '{_join(path, match[0])}'?"
    else:
        scope = f" under '{path}'" if path else ""
        hint = f"valid keys{scope}: {', '.join(valid) or 'none'}"
    return ConfigError(f"unknown config key '{full}' ({hint})", full)


@functools.lru_cache(maxsize=None)
def _fields(cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    """Resolved type and Field of each init field of dataclass ``cls``, in declaration order."""
    try:
        hints = typing.get_type_hints(cls)
    except NameError as err:
        raise TypeError(
            f"cannot resolve the type annotations of {cls.__qualname__}: {err} "
            "(config dataclasses must be defined at module level)"
        ) from err
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls) if f.init}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``Optional[X]`` -> ``(X, True)``; other unions are returned unchanged."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not _NoneType]
        if len(rest) == 1:
            return rest[0], len(rest) < len(args)
        return tp, _NoneType in args
    return tp, tp is _NoneType


_LIST_ORIGINS = (list, Sequence, typing.List)
_DICT_ORIGINS = (dict, Mapping, typing.Dict)


def _kind(tp: Any) -> str:
    """Classify a (non-optional) annotation as 'dataclass', 'list', 'tuple', 'dict' or 'other'."""
    if _is_dataclass_type(tp):
        return "dataclass"
    origin = typing.get_origin(tp) or tp
    if origin in _LIST_ORIGINS:
        return "list"
    if origin in (tuple, typing.Tuple):
        return "tuple"
    if origin in _DICT_ORIGINS:
        return "dict"
    return "other"


# ----------------------------------------------------------------------------- from_dict


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it in its typed form."""
    if tp is Any or tp is object:
        return value
    if tp is _NoneType or tp is None:
        if value is None:
            return None
        raise _mismatch(value, tp, path)

    origin, args = typing.get_origin(tp), typing.get_args(tp)

    if origin is Union or origin is types.UnionType:
        if value is None and _NoneType in args:
            return None
        deeper: ConfigError | None = None
        for arg in args:
            if arg is _NoneType:
                continue
            try:
                return _coerce(value, arg, path)
            except _Mismatch as err:
                if err.path != path and deeper is None:
                    deeper = err
            except ConfigError as err:
                if deeper is None:
                    deeper = err
        raise deeper if deeper is not None else _mismatch(value, tp, path)

    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return choice
        raise _mismatch(value, tp, path)

    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return from_dict(tp, value, path)
        raise _mismatch(value, tp, path, "expected a mapping")

    kind = _kind(tp)
    if kind in ("list", "tuple"):
        if not isinstance(value, (list, tuple)):
            raise _mismatch(value, tp, path)
        if kind == "list":
            item = args[0] if args else Any
            return [_coerce(v, item, _join(path, i)) for i, v in enumerate(value)]
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            return tuple(_coerce(v, item, _join(path, i)) for i, v in enumerate(value))
        if args == ((),):  # tuple[()]
            args = ()
        if len(value) != len(args):
            raise _mismatch(value, tp, path, f"{len(value)} items instead of {len(args)}")
        return tuple(_coerce(v, a, _join(path, i)) for i, (v, a) in enumerate(zip(value, args)))

    if kind == "dict":
        if not isinstance(value, Mapping):
            raise _mismatch(value, tp, path)
        key_tp, val_tp = args if len(args) == 2 else (Any, Any)
        out = {}
        for k, v in value.items():
            sub = _join(path, k)
            out[_coerce_key(k, key_tp, sub)] = _coerce(v, val_tp, sub)
        return out

    return _coerce_scalar(value, tp, path)


def _coerce_key(key: Any, tp: Any, path: str) -> Any:
    if tp is str and isinstance(key, int) and not isinstance(key, bool):
        return str(key)  # YAML reads `64: 1.0` with an int key
    try:
        return _coerce(key, tp, path)
    except _Mismatch:
        raise _Mismatch(f"invalid key in '{path.rpartition('.')[0] or path}': expected {type_name(tp)}, "
                        f"got {_short(key)} ({type(key).__name__})", path) from None


def _coerce_scalar(value: Any, tp: Any, path: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise _mismatch(value, tp, path)
    if tp is int:
        if isinstance(value, bool):
            raise _mismatch(value, tp, path)
        if isinstance(value, numbers.Integral):
            return int(value)
        number = value
        if isinstance(value, str):  # PyYAML reads `1e5` as a string
            try:
                return int(value.strip())
            except ValueError:
                try:
                    number = float(value)
                except ValueError:
                    raise _mismatch(value, tp, path) from None
        if isinstance(number, numbers.Real) and float(number).is_integer():
            return int(number)
        raise _mismatch(value, tp, path)
    if tp is float:
        if isinstance(value, bool):
            raise _mismatch(value, tp, path)
        if isinstance(value, numbers.Real):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `1e-4` as a string
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _mismatch(value, tp, path)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _mismatch(value, tp, path)
    if isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, (str, os.PathLike)):
            return tp(value)
        raise _mismatch(value, tp, path)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        for member in tp:
            if value == member.value and type(value) is type(member.value):
                return member
        if isinstance(value, str) and value in tp.__members__:
            return tp[value]
        choices = ", ".join(repr(m.value) for m in tp)
        raise _mismatch(value, tp, path, f"choices: {choices}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _mismatch(value, tp, path)
    raise TypeError(f"unsupported config annotation {tp!r} for '{path}'")


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking keys and types recursively.

    Missing optional keys take the dataclass defaults. The dataclass's own
    ``__post_init__`` runs; a ``ValueError``/``TypeError`` it raises becomes a
    :class:`ConfigError` naming ``path``.
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise _Mismatch(
            f"expected a mapping of {cls.__name__} keys for {_where(path)}, "
            f"got {_short(data)} ({type(data).__name__})",
            path,
        )
    specs = _fields(cls)
    for key in data:
        if key not in specs:
            raise _unknown_key(path, key, specs)
    kwargs = {}
    for name, (tp, spec) in specs.items():
        sub = _join(path, name)
        if name in data:
            kwargs[name] = _coerce(data[name], tp, sub)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{sub}' (expected {type_name(tp)})", sub)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        where = f"at '{path}' ({cls.__name__})" if path else cls.__name__
        raise ConfigError(f"invalid config {where}: {err}", path) from err


# ----------------------------------------------------------------------------- to_dict / YAML


def _plain(value: Any, path: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name), _join(path, f.name))
            for f in dataclasses.fields(value)
            if f.init
        }
    if isinstance(value, enum.Enum):
        return _plain(value.value, path)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            key = _plain(k, path)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise TypeError(f"config key {k!r} in '{path}' is not YAML-safe")
            out[key] = _plain(v, _join(path, k))
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [_plain(v, _join(path, i)) for i, v in enumerate(items)]
    raise TypeError(f"cannot convert {type(value).__name__} at {_where(path)} to a plain config value")


def to_dict(obj: Any) -> dict[str, Any]:
    """Convert a config dataclass (or a mapping of config values) into plain YAML-safe types.

    Every init field is included (``init=False`` fields are recomputed on load),
    tuples become lists, enums their values and paths strings.
    """
    if not (isinstance(obj, Mapping) or (dataclasses.is_dataclass(obj) and not isinstance(obj, type))):
        raise TypeError(f"to_dict needs a dataclass instance or a mapping, got {type(obj).__name__}")
    return _plain(obj, "")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys instead of silently keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r}", key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_error(err: yaml.YAMLError, source: str) -> ConfigError:
    mark = getattr(err, "problem_mark", None)
    where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else source
    problem = getattr(err, "problem", None) or str(err)
    return ConfigError(f"invalid YAML in {where}: {problem}")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping from ``path`` (an empty file gives ``{}``)."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {file}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory, not a YAML file: {file}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {file}: {err}") from err
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as err:
        raise _yaml_error(err, str(file)) from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {file} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def dump_yaml(obj: Any, path: str | os.PathLike) -> Path:
    """Write a config dataclass (or mapping) to ``path`` as YAML, creating parent folders."""
    file = Path(path).expanduser()
    file.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=False, allow_unicode=True)
    file.write_text(text, encoding="utf-8")
    return file


# ----------------------------------------------------------------------------- merging and overrides


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Return a new dict: ``override`` merged into ``base``; nested mappings merge, anything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _child_type(tp: Any, segment: str, path: str, full_key: str) -> Any:
    """Annotation of ``segment`` inside a value of annotation ``tp`` (validates the segment)."""
    tp, _ = _strip_optional(tp)
    kind = _kind(tp)
    args = typing.get_args(tp)
    if kind == "dataclass":
        specs = _fields(tp)
        if segment not in specs:
            raise _unknown_key(path, segment, specs)
        return specs[segment][0]
    if kind in ("list", "tuple"):
        if not segment.isdigit():
            raise ConfigError(
                f"invalid override key '{full_key}': '{path}' is a list, so '{segment}' must be an index", path
            )
        if kind == "tuple" and args and not (len(args) == 2 and args[1] is Ellipsis):
            index = int(segment)
            return args[index] if index < len(args) else Any
        return args[0] if args else Any
    if kind == "dict":
        return args[1] if len(args) == 2 else Any
    if tp is Any or tp is object or typing.get_origin(tp) in (Union, types.UnionType):
        return Any
    raise ConfigError(
        f"invalid override key '{full_key}': '{path}' has type {type_name(tp)}, not a section", path
    )


def _stringish(tp: Any) -> tuple[bool, bool]:
    """(whether ``tp`` only takes strings, whether it takes None)."""
    inner, optional = _strip_optional(tp)
    if inner is str or (isinstance(inner, type) and issubclass(inner, PurePath)):
        return True, optional
    if typing.get_origin(inner) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(inner)), optional
    return False, optional


def _parse_override_value(raw: str, tp: Any, key: str) -> Any:
    text = raw.strip()
    stringish, optional = _stringish(tp)
    try:
        value = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as err:
        if stringish:
            return text
        raise ConfigError(
            f"cannot parse the value of override '{key}': {text!r} ({getattr(err, 'problem', None) or err})", key
        ) from err
    if stringish and not isinstance(value, str) and not (value is None and optional):
        return text  # `name=yes`, `tag=1.0`, `path=~` stay strings for string fields
    return value


def _field_default(cls: Any, name: str) -> Any:
    cls, _ = _strip_optional(cls)
    if not _is_dataclass_type(cls):
        return dataclasses.MISSING
    spec = _fields(cls)[name][1]
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return dataclasses.MISSING


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
    """The key ``segment`` addresses in a mapping of annotation ``tp`` (``'64'`` -> ``64`` for int keys)."""
    if segment in node:
        return segment
    inner, _ = _strip_optional(tp)
    if _kind(inner) == "dict":
        args = typing.get_args(inner)
        if args and args[0] is not str:
            try:
                return _coerce(segment, args[0], segment)
            except ConfigError:
                pass
    return segment


def _apply_one(data: dict[str, Any], segments: list[str], value: Any, cls: type) -> None:
    node: Any = data
    tp: Any = cls
    path = ""
    for depth, segment in enumerate(segments):
        last = depth == len(segments) - 1
        child_tp = _child_type(tp, segment, path, ".".join(segments))
        sub = _join(path, segment)
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
                default = _field_default(tp, segment)
                if default is not dataclasses.MISSING and default is not None:
                    child = _plain(default, sub)  # a fresh plain copy of the field default
                elif _kind(_strip_optional(child_tp)[0]) in ("list", "tuple"):
                    child = []
                else:
                    child = {}
            node[key] = child
        else:
            raise ConfigError(f"cannot set '{'.'.join(segments)}': '{path}' holds {_short(node)}, not a section", path)
        node, tp, path = child, child_tp, sub


def _leaf_type(cls: type, segments: list[str]) -> Any:
    tp: Any = cls
    path = ""
    for segment in segments:
        tp = _child_type(tp, segment, path, ".".join(segments))
        path = _join(path, segment)
    return tp


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str], cls: type) -> dict[str, Any]:
    """Return a copy of ``data`` with ``dotted.key=value`` overrides applied.

    Values are parsed as YAML (``[32, 64]``, ``{a: 1}``, ``1e-4``, ``~/pics``);
    for string-typed fields a value YAML would read as another type stays a string.
    Keys are checked against ``cls`` before anything is applied; integer segments
    index lists (``stages.1.steps=5``). Setting a key replaces its whole value.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"invalid override {item!r}: expected 'dotted.key=value'")
        segments = key.split(".")
        if not all(s.strip() for s in segments):
            raise ConfigError(f"invalid override {item!r}: empty key segment in {key!r}")
        segments = [s.strip() for s in segments]
        value = _parse_override_value(raw, _leaf_type(cls, segments), ".".join(segments))
        parsed.append((segments, value))
    out = copy.deepcopy(dict(data))
    for segments, value in parsed:
        _apply_one(out, segments, value, cls)
    return out


# ----------------------------------------------------------------------------- load_config

PresetMap = Mapping[str, Union[Mapping[str, Any], Callable[[], Any]]]


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


def _resolve(source: str | os.PathLike, presets: PresetMap, use_preset_key: bool,
             base_dir: Path | None, seen: tuple[str, ...], context: str = "") -> dict[str, Any]:
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


def _expand(data: dict[str, Any], ident: str, presets: PresetMap, use_preset_key: bool,
            here: Path | None, seen: tuple[str, ...]) -> dict[str, Any]:
    if ident in seen:
        raise ConfigError(f"preset cycle: {' -> '.join(seen + (ident,))}", PRESET_KEY)
    if use_preset_key and PRESET_KEY in data:
        base = data.pop(PRESET_KEY)
        if not isinstance(base, str):
            raise ConfigError(f"'{PRESET_KEY}' in {ident} must be a preset name or file, got {_short(base)}", PRESET_KEY)
        base_data = _resolve(base, presets, use_preset_key, here, seen + (ident,), f" (named by {ident})")
        data = deep_merge(base_data, data)
    return data


def load_config(
    cls: type[T],
    source: str | os.PathLike | Mapping[str, Any] | None = None,
    overrides: Iterable[str] = (),
    presets: PresetMap | None = None,
) -> T:
    """Build config ``cls`` from defaults, a preset or YAML file, and overrides.

    ``source`` is ``None`` (class defaults), a preset name (a key of ``presets``,
    whose value is a dict, a dataclass, or a callable returning either), a path to a
    YAML file, or a mapping. A file (or preset) may start from another with a top-level
    ``preset: NAME`` key (a preset name or a YAML path relative to the file); its
    own keys are deep-merged over that base. ``overrides`` are applied last.
    """
    presets = presets if presets is not None else {}
    use_preset_key = PRESET_KEY not in _fields(cls)
    if source is None:
        data: dict[str, Any] = {}
    elif dataclasses.is_dataclass(source) and not isinstance(source, type):
        data = to_dict(source)
    elif isinstance(source, Mapping):
        data = _expand(copy.deepcopy(dict(source)), "the given mapping", presets, use_preset_key, None, ())
    else:
        data = _resolve(source, presets, use_preset_key, None, ())
    return from_dict(cls, apply_overrides(data, overrides, cls))
