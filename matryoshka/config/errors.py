"""The one error type of configuration loading, and the messages that name the key at fault."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """Invalid configuration; ``path`` is the dotted key at fault (``""`` for the root)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


def join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unknown_key(path: str, key: object, valid: Iterable[str]) -> ConfigError:
    """An unknown key, with the closest valid one suggested (or the valid ones listed)."""
    valid = list(valid)
    full = join(path, key)
    match = difflib.get_close_matches(str(key), valid, n=1)
    if match:
        hint = f"did you mean '{join(path, match[0])}'?"
    else:
        scope = f" under '{path}'" if path else ""
        hint = f"valid keys{scope}: {', '.join(valid) or 'none'}"
    return ConfigError(f"unknown config key '{full}' ({hint})", full)
