"""Typed configuration: loading dataclass configs from presets, YAML files and overrides."""

from .loader import (
    ConfigError,
    apply_overrides,
    deep_merge,
    dump_yaml,
    from_dict,
    load_config,
    load_yaml,
    to_dict,
)

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
