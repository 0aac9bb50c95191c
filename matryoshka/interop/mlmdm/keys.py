"""Parameter-name correspondence between ml-mdm checkpoints and our NestedUNet.

Our module tree mirrors ml-mdm's, so only the sinusoidal embedding MLPs are named
differently (ml-mdm keeps them as loose layers or index-named module lists).
"""

from __future__ import annotations

import re

_Rules = list[tuple[re.Pattern[str], str]]

_OURS_TO_MLMDM: _Rules = [
    (re.compile(r"(^|\.)temb\.layer([12])\."), r"\1temb_layer\2."),
    (re.compile(r"(^|\.)cond_layers\.(\w+)\.layer1\."), r"\1cond_layers.\2.0."),
    (re.compile(r"(^|\.)cond_layers\.(\w+)\.layer2\."), r"\1cond_layers.\2.1."),
]
_MLMDM_TO_OURS: _Rules = [
    (re.compile(r"(^|\.)temb_layer([12])\."), r"\1temb.layer\2."),
    (re.compile(r"(^|\.)cond_layers\.(\w+)\.0\."), r"\1cond_layers.\2.layer1."),
    (re.compile(r"(^|\.)cond_layers\.(\w+)\.1\."), r"\1cond_layers.\2.layer2."),
]


def _rename(key: str, rules: _Rules) -> str:
    for pattern, replacement in rules:
        key = pattern.sub(replacement, key)
    return key


def to_mlmdm_key(key: str) -> str:
    """Our parameter name -> ml-mdm's."""
    return _rename(key, _OURS_TO_MLMDM)


def from_mlmdm_key(key: str) -> str:
    """ml-mdm's parameter name -> ours."""
    return _rename(key, _MLMDM_TO_OURS)
