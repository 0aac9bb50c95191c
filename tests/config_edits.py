"""Editing nested config dicts (ml-mdm and diffusers configs) in tests."""

from __future__ import annotations

import copy


def edit(config: dict, path: str, value) -> dict:
    """A copy of ``config`` with the dotted ``path`` set to ``value``."""
    config = copy.deepcopy(config)
    *parents, last = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[last] = value
    return config
