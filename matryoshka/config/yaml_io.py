"""YAML files of configs: strict reading (duplicate keys are errors) and plain writing."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .schema import to_dict


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads ``1e-4`` as a number, as YAML 1.2 does.

    PyYAML follows YAML 1.1, where a float needs a dot: ``lr: 1e-4`` would be the string '1e-4'.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """Quotes strings such as '1e-4' that :class:`StrictLoader` would read back as numbers."""


_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
for _cls in (StrictLoader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=StrictLoader)


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
        data = parse_yaml(text)
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
    text = yaml.dump(to_dict(obj), Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
    file.write_text(text, encoding="utf-8")
    return file
