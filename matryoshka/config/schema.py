"""Typed configs from plain data and back: pydantic validates, we name the key at fault.

pydantic (lax mode) does the type checking and coercion of any dataclass tree: lists to
tuples, strings to paths, enums and literals, ``X | None``. What it does not do, and this
module adds: unknown keys are errors with the closest valid key suggested (pydantic ignores
extra keys of plain dataclasses), booleans are never read as numbers (``steps: true``) nor
numbers as booleans, and every message names the full dotted key and the expected type.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

from pydantic import TypeAdapter, ValidationError
from pydantic_core import to_jsonable_python

from .errors import ConfigError, join, short, unknown_key

T = TypeVar("T")
_NoneType = type(None)


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
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


@functools.cache
def fields(cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    """Resolved annotation and Field of each init field of dataclass ``cls``, in order."""
    try:
        hints = typing.get_type_hints(cls)
    except NameError as err:
        raise TypeError(
            f"cannot resolve the type annotations of {cls.__qualname__}: {err} "
            "(config dataclasses must be defined at module level)"
        ) from err
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls) if f.init}


def is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def strip_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; other unions are returned unchanged."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not _NoneType]
        if len(rest) == 1:
            return rest[0], True
        return tp, _NoneType in args
    return tp, tp is _NoneType


def kind(tp: Any) -> str:
    """Classify a (non-optional) annotation as 'dataclass', 'list', 'tuple', 'dict' or 'other'."""
    if is_dataclass_type(tp):
        return "dataclass"
    origin = typing.get_origin(tp) or tp
    if origin in (list, Sequence):
        return "list"
    if origin is tuple:
        return "tuple"
    if origin in (dict, Mapping):
        return "dict"
    return "other"


def child_type(tp: Any, segment: str, path: str, full_key: str) -> Any:
    """Annotation of ``segment`` inside a value of annotation ``tp`` (validates the segment)."""
    tp, _ = strip_optional(tp)
    args = typing.get_args(tp)
    match kind(tp):
        case "dataclass":
            specs = fields(tp)
            if segment not in specs:
                raise unknown_key(path, segment, specs)
            return specs[segment][0]
        case "list" | "tuple" as sequence:
            if not segment.isdigit():
                raise ConfigError(
                    f"invalid override key '{full_key}': '{path}' is a list, so '{segment}' must be an index", path
                )
            if sequence == "tuple" and args and not (len(args) == 2 and args[1] is Ellipsis):
                index = int(segment)
                return args[index] if index < len(args) else Any
            return args[0] if args else Any
        case "dict":
            return args[1] if len(args) == 2 else Any
    if tp is Any or typing.get_origin(tp) in (Union, types.UnionType):
        return Any
    raise ConfigError(f"invalid override key '{full_key}': '{path}' has type {type_name(tp)}, not a section", path)


def mismatch(value: object, tp: Any, path: str, detail: str = "") -> ConfigError:
    where = f" for '{path}'" if path else ""
    extra = f" ({detail})" if detail else ""
    return ConfigError(
        f"invalid value{where}: expected {type_name(tp)}, got {short(value)} ({type(value).__name__}){extra}", path
    )


def _check(value: Any, tp: Any, path: str) -> None:
    """Unknown keys and bool/number confusions, which pydantic's lax mode lets through."""
    tp, optional = strip_optional(tp)
    if value is None and optional:
        return
    structure = kind(tp)
    if structure == "dataclass" and isinstance(value, Mapping):
        specs = fields(tp)
        for key, item in value.items():
            if key not in specs:
                raise unknown_key(path, key, specs)
            _check(item, specs[key][0], join(path, key))
    elif structure in ("list", "tuple") and isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            sub = join(path, index)
            _check(item, child_type(tp, str(index), path, sub), sub)
    elif structure == "dict" and isinstance(value, Mapping):
        item_type = child_type(tp, "", path, path)
        for key, item in value.items():
            _check(item, item_type, join(path, key))
    elif (tp in (int, float) and isinstance(value, bool)) or (
        tp is bool and not (isinstance(value, bool) or str(value).strip().lower() in ("true", "false"))
    ):
        raise mismatch(value, tp, path)


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _annotation_at(cls: type, location: Sequence[str | int]) -> Any:
    tp: Any = cls
    for segment in location:
        try:
            tp = child_type(tp, str(segment), "", "")
        except ConfigError:
            break
    return tp


def _translate(err: ValidationError, cls: type, path: str) -> ConfigError:
    """The first pydantic error as one line naming the dotted key and the expected type."""
    first = err.errors()[0]
    location = [segment for segment in first["loc"] if segment != "[key]"]
    where = join(path, ".".join(str(segment) for segment in location)) if location else path
    if first["type"] == "missing" and location and isinstance(location[-1], int):  # a tuple too short
        location = location[:-1]
        where = join(path, ".".join(str(segment) for segment in location)) if location else path
        tp = _annotation_at(cls, location)
        return ConfigError(f"invalid value for '{where}': expected {type_name(tp)}, too few items", where)
    tp = _annotation_at(cls, location)
    if first["type"] == "missing":
        return ConfigError(f"missing required config key '{where}' (expected {type_name(tp)})", where)
    if first["type"] == "value_error":
        owner = getattr(tp, "__name__", cls.__name__)
        cause = first.get("ctx", {}).get("error")
        at = f"at '{where}' ({owner})" if where else owner
        error = ConfigError(f"invalid config {at}: {cause if cause is not None else first['msg']}", where)
        error.__cause__ = cause  # the dataclass's own ValueError, re-raised as the cause by from_dict
        return error
    if "[key]" in first["loc"]:
        key_type = typing.get_args(strip_optional(tp)[0])[0] if typing.get_args(tp) else Any
        parent = where.rpartition(".")[0] or where
        return ConfigError(
            f"invalid key in '{parent}': expected {type_name(key_type)}, got {short(first['input'])}", where
        )
    detail = first["msg"] if first["type"] in ("too_short", "too_long") else ""
    return mismatch(first["input"], tp, where, detail)


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking keys and types recursively.

    Missing keys take the dataclass defaults. The dataclass's own ``__post_init__`` runs; a
    ``ValueError`` it raises becomes a :class:`ConfigError` naming the key of that dataclass.
    """
    if not is_dataclass_type(cls):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        where = f"'{path}'" if path else "the config root"
        raise ConfigError(
            f"expected a mapping of {cls.__name__} keys for {where}, got {short(data)} ({type(data).__name__})", path
        )
    _check(data, cls, path)
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as err:
        error = _translate(err, cls, path)
        raise error from error.__cause__


def to_dict(obj: Any) -> dict[str, Any]:
    """A config dataclass (or a mapping of config values) as plain YAML-safe values.

    Every field is included, so a dumped config loads back to an equal object without the
    presets that produced it; tuples become lists, enums their values, paths strings.
    """
    if not (isinstance(obj, Mapping) or (dataclasses.is_dataclass(obj) and not isinstance(obj, type))):
        raise TypeError(f"to_dict needs a dataclass instance or a mapping, got {type(obj).__name__}")
    return to_jsonable_python(obj)
