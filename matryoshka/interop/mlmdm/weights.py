"""ml-mdm's state dicts -> ours: names and shapes checked against the model, tensors renamed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ...models import ModelConfig, NestedUNet
from .errors import MlmdmMismatchError
from .keys import from_mlmdm_key, to_mlmdm_key

__all__ = ["convert_state_dict", "expected_shapes", "map_mlmdm_keys"]

# How many names each kind of mismatch lists before "... and N more".
_SHOWN = 12


def expected_shapes(model_config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our model's state-dict names and shapes, computed on the meta device (no memory)."""
    with torch.device("meta"):
        model = NestedUNet(model_config)
    return {name: tuple(value.shape) for name, value in model.state_dict().items()}


def _shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _mismatch_report(source: str, problems: Sequence[tuple[str, list[str]]]) -> str:
    lines = [f"{source} does not match the model described by the config:"]
    for title, items in problems:
        if items:
            shown = "\n    ".join(items[:_SHOWN])
            more = f"\n    ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
            lines.append(f"  {title} ({len(items)}):\n    {shown}{more}")
    lines.append("  (names are ml-mdm's; check that the config belongs to this checkpoint)")
    return "\n".join(lines)


def map_mlmdm_keys(
    shapes: Mapping[str, Sequence[int]], model_config: ModelConfig, source: str = "the checkpoint"
) -> dict[str, str]:
    """Map ml-mdm parameter names to ours, checking every name and shape.

    ``shapes`` maps ml-mdm names to shapes (tensors or their ``.shape`` both work).
    Returns ``{ml-mdm name: our name}``. Raises :class:`MlmdmMismatchError` listing every
    missing, unexpected and mis-shaped tensor.
    """
    expected = expected_shapes(model_config)
    mapping: dict[str, str] = {}
    clashes = []
    for key in shapes:
        ours = from_mlmdm_key(key)
        if ours in mapping.values():
            clashes.append(key)
        mapping[key] = ours
    found = {ours: tuple(int(s) for s in getattr(shapes[key], "shape", shapes[key])) for key, ours in mapping.items()}
    missing = sorted(to_mlmdm_key(name) for name in expected if name not in found)
    unexpected = sorted(key for key, ours in mapping.items() if ours not in expected)
    wrong = [
        f"{key}: {_shape_text(found[ours])} in the checkpoint, {_shape_text(expected[ours])} in the model"
        for key, ours in sorted(mapping.items())
        if ours in expected and found[ours] != expected[ours]
    ]
    if missing or unexpected or wrong or clashes:
        problems = [("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong), ("duplicate", clashes)]
        raise MlmdmMismatchError(_mismatch_report(source, problems))
    return mapping


def convert_state_dict(
    tensors: Mapping[str, torch.Tensor], model_config: ModelConfig, source: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """ml-mdm tensors under our names, after checking names, shapes and values."""
    mapping = map_mlmdm_keys(tensors, model_config, source)
    bad = [key for key, value in tensors.items() if value.dtype.is_floating_point and not torch.isfinite(value).all()]
    if bad:
        raise MlmdmMismatchError(f"{source} has NaN or Inf values in {len(bad)} tensors, e.g. {', '.join(bad[:3])}")
    return {mapping[key]: value.detach().contiguous() for key, value in tensors.items()}
