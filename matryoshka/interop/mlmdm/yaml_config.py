"""Reading ml-mdm's YAML config files as ml-mdm reads them, noting duplicated keys."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .errors import MlmdmConfigError

__all__ = ["read_mlmdm_yaml"]


class _RecordingLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (the last duplicate key wins, as in ml-mdm) noting every duplicate."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    self.duplicates.append(f"'{key}' (line {line} replaces line {seen[key]})")
                seen[key] = line
            except TypeError:
                # An unhashable key (a list or mapping): PyYAML's own construct_mapping below
                # reports it as a YAML error with its position.
                pass
        return super().construct_mapping(node, deep=deep)


def read_mlmdm_yaml(path: str | os.PathLike) -> tuple[dict[str, Any], list[str]]:
    """Read an ml-mdm YAML config: ``(mapping, notes)``.

    PyYAML keeps the last of duplicated keys (ml-mdm's released configs have some:
    ``diffusion_config`` twice in cc12m_64x64.yaml, ``max_caption_length`` twice in
    cc12m_1024x1024.yaml); so does this reader, and each duplicate is listed in the notes.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"ml-mdm config file not found: {file}")
    text = file.read_text(encoding="utf-8")
    loader = _RecordingLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as error:
        raise MlmdmConfigError(f"invalid YAML in {file}: {error}") from error
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise MlmdmConfigError(f"{file} must hold a mapping at the top level, got {type(data).__name__}")
    notes = [f"duplicate key {d} in {file.name}: the last one is used, as by ml-mdm" for d in loader.duplicates]
    return data, notes
