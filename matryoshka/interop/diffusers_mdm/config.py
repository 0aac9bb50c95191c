"""The port's per-level ``config.json`` -> our ModelConfig, refusing what it cannot express."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...models.config import LevelConfig, ModelConfig
from ..mlmdm.errors import MlmdmError

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# Attention and feed-forward GroupNorms of the port (MatryoshkaTransformerBlock, MatryoshkaFeedForward).
_ATTENTION_GROUPS = 32
# Options the port accepts but our NestedUNet computes only at these values (config.json key -> value).
_FIXED = {
    "act_fn": "silu",
    "resnet_time_scale_shift": "scale_shift",
    "time_embedding_type": "positional",
    "freq_shift": 0,
    "norm_eps": 1e-5,
    "center_input_sample": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": "matryoshka",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "resnet_out_scale_factor": 1.0,
    "mid_block_scale_factor": 1,
    "resnet_skip_time_act": False,
    "temporal_mode": False,
    "attention_type": "default",
    "downsample_padding": 1,
    "num_attention_heads": None,
    "reverse_transformer_layers_per_block": None,
    "skip_inner_unet_input": False,
    "in_channels": 3,
    "out_channels": 3,
}


# The options NestedUNet2DConditionModel hands to its UNet base. The others are recorded in its
# config.json, but the port builds its layers with MatryoshkaUNet2DConditionModel's defaults:
_NESTED_PASSED = {
    "block_out_channels",
    "cross_attention_dim",
    "resnet_time_scale_shift",
    "down_block_types",
    "up_block_types",
    "mid_block_type",
    "flip_sin_to_cos",
    "transformer_layers_per_block",
    "layers_per_block",
    "masked_cross_attention",
    "micro_conditioning_scale",
    "addition_embed_type",
    "time_embedding_dim",
    "temporal_mode",
    "use_attention_ffn",
    "skip_normalization",
    "skip_inner_unet_input",
    "in_channels",
    "out_channels",
}
_NESTED_DEFAULTS = {"norm_num_groups": 32, "dropout": 0.0, "attention_head_dim": 8, "encoder_hid_dim": None}


class DiffusersMdmError(MlmdmError):
    """A diffusers-port option or file we cannot convert faithfully (a ``ValueError``)."""


@dataclass
class _Level:
    """One UNet of the port, parsed: our LevelConfig and what the checks and key map need."""

    config: LevelConfig
    time_dim: int
    sinusoid: int
    """Width of the port's time sinusoid (its Timesteps) for this UNet."""
    flip: bool
    text_dim: int | None
    cross_dim: int | None
    masked: bool


def _per_stage(value: Any, stages: int, name: str) -> list[int]:
    values = [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * stages
    if len(values) != stages:
        raise DiffusersMdmError(f"{name} needs one value per block ({stages}), got {value}")
    return values


def _attention_layers(options: Mapping[str, Any], where: str, stages: int) -> list[int]:
    """Transformer blocks after each ResNet per stage; down and up blocks must agree (ours share them)."""
    down, up = list(options.get("down_block_types", [])), list(options.get("up_block_types", []))
    layers = _per_stage(options.get("transformer_layers_per_block", 1), stages, f"{where}.transformer_layers_per_block")
    known = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
    if len(down) != stages or len(up) != stages or not set(down + up) <= known:
        raise DiffusersMdmError(f"{where}: down/up_block_types must be {stages} of {sorted(known)}, got {down}, {up}")
    cross_down = [kind.startswith("CrossAttn") for kind in down]
    if cross_down != [kind.startswith("CrossAttn") for kind in reversed(up)]:
        raise DiffusersMdmError(f"{where}: up_block_types {up} do not mirror down_block_types {down}")
    return [n if cross else 0 for n, cross in zip(layers, cross_down, strict=True)]


def _nested_options(options: Mapping[str, Any], where: str, notes: list[str]) -> dict[str, Any]:
    """A NestedUNet's options as the port uses them (see _NESTED_PASSED)."""
    ignored = sorted(key for key, default in _NESTED_DEFAULTS.items() if options.get(key, default) != default)
    if ignored:
        notes.append(
            f"{where}: {', '.join(ignored)} recorded but not used by the port's NestedUNet (its layers have "
            "32 groups, no dropout, 8 heads, no text projection): ignored here too"
        )
    return {key: value for key, value in options.items() if key in _NESTED_PASSED}


def _level(options: Mapping[str, Any], where: str, innermost: bool, notes: list[str]) -> _Level:
    if not innermost:
        options = _nested_options(options, where, notes)
    for key, value in _FIXED.items():
        if key in options and options[key] != value:  # JSON numbers compare exactly (1e-05 == 1e-5)
            raise DiffusersMdmError(f"{where}.{key}={options[key]!r} is not supported (only {value!r})")
    channels = [int(c) for c in options.get("block_out_channels", [])]
    if not channels:
        raise DiffusersMdmError(f"{where}.block_out_channels is missing")
    stages = len(channels)
    layers = _attention_layers(options, where, stages)
    heads = options.get("attention_head_dim", 8)  # the port's name for the number of heads
    if isinstance(heads, (list, tuple)):
        if len(set(heads)) != 1:
            raise DiffusersMdmError(f"{where}.attention_head_dim: one head count for all blocks, got {heads}")
        heads = heads[0]
    ffn = bool(options.get("use_attention_ffn", True))
    micro = options.get("micro_conditioning_scale")
    if micro is None:
        raise DiffusersMdmError(
            f"{where}.micro_conditioning_scale=null: the port then drops the pooled text "
            "embedding (added only with the micro-conditioning), which our model cannot do"
        )
    mid = options.get("mid_block_type")
    if innermost and mid != "UNetMidBlock2DCrossAttn":
        raise DiffusersMdmError(f"{where}.mid_block_type={mid!r}: the innermost UNet needs UNetMidBlock2DCrossAttn")
    if innermost and not ffn:
        raise DiffusersMdmError(
            f"{where}.use_attention_ffn=false: the port's mid block has a feed-forward layer "
            "regardless, ours follow the level's attention_ffn"
        )
    if not innermost and mid is not None:
        raise DiffusersMdmError(f"{where}.mid_block_type={mid!r}: an outer UNet's mid block is never run")
    groups = int(options.get("norm_num_groups", 32))
    time_dim = int(options.get("time_embedding_dim") or 4 * channels[0])
    if innermost:
        sinusoid = channels[0]
    elif int(micro) in (256, 1024):  # the port's NestedUNet builds its time sinusoid for these scales only
        sinusoid = channels[0] * (4 if int(micro) == 256 else 8)
    else:
        raise DiffusersMdmError(f"{where}.micro_conditioning_scale={micro}: the port's NestedUNet runs at 256 or 1024")
    hid = options.get("encoder_hid_dim")
    if hid is not None and (not innermost or options.get("encoder_hid_dim_type", "text_proj") != "text_proj"):
        raise DiffusersMdmError(f"{where}.encoder_hid_dim: only the innermost UNet's text_proj is ever used")
    cross = options.get("cross_attention_dim")
    try:
        config = LevelConfig(
            channels=channels,
            res_blocks=_per_stage(options.get("layers_per_block", 2), stages, f"{where}.layers_per_block"),
            attention_stages=[s for s in range(stages) if layers[s] > 0],
            attention_layers=layers,
            attention_heads=int(heads),
            attention_ffn=ffn,
            mid_attention=innermost,
            dropout=float(options.get("dropout", 0.0)),
            norm_groups=groups,
            attention_norm_groups=None if groups == _ATTENTION_GROUPS else _ATTENTION_GROUPS,
            # The port normalises only in NestedUNet2DConditionModel, never in the innermost UNet.
            normalize_input=not innermost and not options.get("skip_normalization", True),
            micro_conditioning={"scale": float(micro)},
        )
    except ValueError as error:
        raise DiffusersMdmError(f"{where} does not fit our architecture: {error}") from error
    return _Level(
        config,
        time_dim,
        sinusoid,
        bool(options.get("flip_sin_to_cos", innermost)),
        None if hid is None else int(hid),
        None if cross is None else int(cross),
        bool(options.get("masked_cross_attention", not innermost)),
    )


def _levels(config: Mapping[str, Any], notes: list[str]) -> list[_Level]:
    """The UNets of a port ``config.json``, outermost first."""
    chain, where, section = [], "config", config
    while isinstance(section, Mapping) and section:
        chain.append((where, section))
        section, where = section.get("inner_config"), f"{where}.inner_config"
        if len(chain) > 4:
            raise DiffusersMdmError("config.json nests more than four UNets")
    if not chain:
        raise DiffusersMdmError("config.json describes no UNet")
    return [_level(options, where, index == len(chain) - 1, notes) for index, (where, options) in enumerate(chain)]


def model_from_diffusers(config: Mapping[str, Any], notes: list[str]) -> tuple[ModelConfig, list[bool]]:
    """Our model for a port ``config.json``, and per level (innermost first) whether its sinusoid is flipped;
    appends to ``notes``."""
    levels = _levels(config, notes)[::-1]  # ours list the innermost first
    inner = levels[0]
    widths = {(level.time_dim, level.sinusoid) for level in levels}
    if len({dim for dim, _ in widths}) > 1 or any(4 * sinusoid != dim or dim % 8 for dim, sinusoid in widths):
        raise DiffusersMdmError(
            f"time embedding widths {sorted(widths)} (time_embedding_dim, sinusoid): every level must share one width "
            "E, a multiple of 8, with an E/4-wide sinusoid (the port cannot run otherwise)"
        )
    if inner.cross_dim is None:
        raise DiffusersMdmError("the innermost UNet has no cross_attention_dim: the port needs text conditioning")
    for index, level in enumerate(levels[1:], start=1):
        if level.config.attention_stages and level.cross_dim != inner.cross_dim:
            raise DiffusersMdmError(
                f"level {index} (innermost first) cross-attends with width {level.cross_dim}, but the innermost UNet "
                f"hands it {inner.cross_dim}-wide tokens"
            )
    try:
        return ModelConfig(
            levels=[level.config for level in levels],
            time_embed_dim=inner.time_dim,
            text_dim=inner.text_dim or inner.cross_dim,
            text_proj_dim=inner.cross_dim if inner.text_dim else 0,
            text_attention_mask=inner.masked,
        ), [level.flip for level in levels]
    except ValueError as error:
        raise DiffusersMdmError(f"the port's model does not fit our architecture: {error}") from error


# ----------------------------------------------------------------------------- names and tensors
