"""The port's tensor names and layouts -> ours, and reading its weight files without running code."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ...models.config import ModelConfig
from ..mlmdm.errors import CheckpointFormatError, MlmdmMismatchError, UnsafeCheckpointError
from ..mlmdm.weights import expected_shapes
from .config import WEIGHT_FILES

_BLOCK = re.compile(
    r"(down|up)_blocks\.(\d+)\.(resnets\.\d+|attentions\.(\d+)\.transformer_blocks\.(\d+)|"
    r"downsamplers\.0\.conv|upsamplers\.0\.conv)\.(.+)"
)
_RESNET = {"time_emb_proj": "time_layer", "conv_shortcut": "conv3"}
_ATTENTION = {
    "attn1.group_norm": "norm",
    "attn1.to_qkv": "qkv",
    "attn2.norm_cross": "norm_cond",
    "attn2.to_kv": "kv_cond",
    "proj_out": "proj_out",
    "ff.group_norm": "ffn.0",
    "ff.linear_gelu.proj": "ffn.1",
    "ff.linear_out": "ffn.3",
}
_TOP = {
    "time_embedding.linear_1": "temb.layer1",
    "time_embedding.linear_2": "temb.layer2",
    "add_embedding.add_timestep_embedder.linear_1": "cond_layers.scale.layer1",
    "add_embedding.add_timestep_embedder.linear_2": "cond_layers.scale.layer2",
    "add_embedding.cond_emb": "cond_emb",
    "encoder_hid_proj": "lm_proj",
    "conv_norm_out": "norm_out",
    "conv_in": "conv_in",
    "conv_out": "conv_out",
    "in_adapter": "in_adapter",
    "out_adapter": "out_adapter",
}


def _rename(part: str, table: Mapping[str, str]) -> str | None:
    layer, _, leaf = part.rpartition(".")
    return f"{table[layer]}.{leaf}" if layer in table else None


def diffusers_key(key: str, model: ModelConfig) -> str | None:
    """Our name for a port parameter name (None when it has no counterpart)."""
    prefix = re.match(r"(inner_unet\.)*", key).group(0)
    rest, level = key[len(prefix) :], model.levels[model.num_levels - 1 - prefix.count("inner_unet.")]
    if rest.startswith("mid_block."):
        mid = {
            "resnets.0.": "mid_blocks.0.resnets.0.",
            "attentions.0.transformer_blocks.0.": "mid_blocks.0.attn.0.",
            "resnets.1.": "mid_blocks.1.resnets.0.",
        }
        for theirs, ours in mid.items():
            if rest.startswith("mid_block." + theirs):
                leaf = rest[len("mid_block." + theirs) :]
                renamed = _rename(leaf, _ATTENTION if "attn" in ours else _RESNET) or leaf
                return prefix + ours + renamed
        return None
    match = _BLOCK.fullmatch(rest)
    if match is None:
        renamed = _rename(rest, _TOP)
        return None if renamed is None else prefix + renamed
    side, block, part, resnet_index, layer, leaf = match.groups()
    where = f"{prefix}{side}_blocks.{block}."
    if part.startswith("resnets"):
        return where + part + "." + (_rename(leaf, _RESNET) or leaf)
    if part.endswith("samplers.0.conv"):
        return where + "resample." + leaf
    stage = int(block) if side == "down" else len(level.channels) - 1 - int(block)
    per_resnet = level.stage_attention_layers(stage)
    renamed = _rename(leaf, _ATTENTION)
    if renamed is None or int(layer) >= per_resnet:
        return None
    return f"{where}attn.{int(resnet_index) * per_resnet + int(layer)}.{renamed}"


def convert_port_state_dict(
    tensors: Mapping[str, torch.Tensor], model: ModelConfig, flips: list[bool], source: str
) -> dict[str, torch.Tensor]:
    """The port's tensors under our names and shapes; refuses missing, unexpected and mis-shaped tensors."""
    expected = expected_shapes(model)
    converted, unexpected, wrong = {}, [], []
    for key, value in tensors.items():
        ours = diffusers_key(key, model)
        if ours is None or ours not in expected or ours in converted:
            unexpected.append(key)
            continue
        value = value.detach()
        if value.dim() == 2 and len(expected[ours]) == 4:  # nn.Linear -> 1x1 convolution
            value = value[:, :, None, None]
        depth = model.num_levels - 1 - key.count("inner_unet.")
        if ours.endswith("temb.layer1.weight") and flips[depth]:
            value = torch.cat(value.chunk(2, dim=1)[::-1], dim=1)  # [cos, sin] columns -> [sin, cos]
        if tuple(value.shape) != expected[ours]:
            wrong.append(f"{key}: {tuple(value.shape)} in the checkpoint, {expected[ours]} in the model")
        elif value.dtype.is_floating_point and not torch.isfinite(value).all():
            wrong.append(f"{key}: NaN or Inf values")
        converted[ours] = value.contiguous()
    missing = sorted(name for name in expected if name not in converted)
    if missing or unexpected or wrong:
        lines = [f"{source} does not match the model its config.json describes:"]
        for title, items in (("missing (our names)", missing), ("unexpected", sorted(unexpected)), ("wrong", wrong)):
            if items:
                more = f"\n    ... and {len(items) - 12} more" if len(items) > 12 else ""
                lines.append(f"  {title} ({len(items)}):\n    " + "\n    ".join(items[:12]) + more)
        raise MlmdmMismatchError("\n".join(lines))
    return converted


# ----------------------------------------------------------------------------- files


def _weight_file(path: Path) -> tuple[Path, Path]:
    """(weights, config.json) for a nesting-level directory or a weight file next to its config.json."""
    folder = path if path.is_dir() else path.parent
    weights = (
        next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None) if path.is_dir() else path
    )
    if weights is None or not weights.is_file():
        raise FileNotFoundError(f"no {' or '.join(WEIGHT_FILES)} in {folder}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json next to {weights} (the port saves one with every nesting level)")
    return weights, folder / "config.json"


def read_port_weights(file: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a ``.bin`` state dict through torch's weights_only unpickler."""
    from pickle import UnpicklingError

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if file.suffix == ".safetensors":
        try:
            return load_file(str(file))
        except SafetensorError as error:
            raise CheckpointFormatError(f"cannot read safetensors file {file}: {error}") from error
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"refusing to load {file}: its pickle holds more than tensors and could run code ({error}). "
            "Nothing from the file was executed"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointFormatError(f"cannot read {file} as a torch state dict: {error}") from error
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointFormatError(f"{file} is not a state dict (a mapping of names to tensors)")
    return dict(state)
