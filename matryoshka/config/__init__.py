"""Typed configuration: dataclass configs from presets, YAML files and ``dotted.key=value`` overrides."""

from .errors import ConfigError
from .loader import load_config
from .overrides import apply_overrides, deep_merge
from .schema import from_dict, to_dict
from .yaml_io import dump_yaml, load_yaml

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
