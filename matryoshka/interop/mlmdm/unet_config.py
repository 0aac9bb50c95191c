"""ml-mdm's ``unet_config`` (a UNet, or NestedUNets around one) -> our :class:`ModelConfig`.

Every option that would make our network compute something different from ml-mdm's is
refused with :class:`MlmdmConfigError`; options that only matter for training are
collected in ``training`` for the caller to refuse or note.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...models.config import LevelConfig, ModelConfig
from .defaults import (
    DEFAULT_TEXT_MODEL,
    MODEL_LEVELS,
    NESTED_DEFAULTS,
    RESNET_DEFAULTS,
    TEXT_ENCODER_DIMS,
    UNET_DEFAULTS,
)
from .errors import MlmdmConfigError
from .values import parse_bool, parse_float, parse_int, parse_ints, parse_micro, with_defaults

__all__ = ["checkpoint_text_dim", "model_from_mlmdm"]

_Chain = list[tuple[str, Mapping[str, Any]]]

# GroupNorm groups of ml-mdm's attention and feed-forward layers (hard-coded in its unet.py).
_ATTENTION_GROUPS = 32


@dataclass
class _Level:
    """One ml-mdm UNet's options, parsed; the fields our LevelConfig and ModelConfig need."""

    channels: list[int]
    res_blocks: list[int]
    attention_stages: list[int]
    attention_layers: list[int]
    groups: int
    dropout: float
    ffn: bool
    micro: dict[str, float]
    temporal_dim: int
    proj_dim: int
    masked: bool
    normalize: bool


def _unet_levels(unet: Any) -> _Chain:
    """The chain ``unet_config -> inner_config -> ...`` as (path, mapping), outermost first."""
    chain: _Chain = []
    where, section = "unet_config", unet
    while True:
        if not isinstance(section, Mapping):
            raise MlmdmConfigError(f"{where} must be a mapping, got {type(section).__name__}")
        chain.append((where, section))
        inner = section.get("inner_config")
        if inner is None:
            return chain
        where, section = f"{where}.inner_config", inner
        if len(chain) > 5:
            raise MlmdmConfigError("unet_config nests more than five UNets")


def _per_stage(options: Mapping[str, Any], name: str, stages: int, where: str) -> list[int]:
    """A per-resolution option: one value for every resolution, or one value each."""
    values = parse_ints(options[name], f"{where}.{name}")
    if len(values) == 1:
        values = values * stages
    if len(values) != stages:
        raise MlmdmConfigError(f"{where}.{name} needs one value or one per resolution ({stages}), got {values}")
    return values


def _refuse_unsupported_layers(where: str, options: Mapping[str, Any]) -> None:
    """Text self-attention heads and video layers, which our model does not have."""
    if parse_int(options["num_lm_head_layers"], f"{where}.num_lm_head_layers"):
        raise MlmdmConfigError(
            f"{where}.num_lm_head_layers > 0 (self-attention layers on the text tokens) is not supported"
        )
    if parse_bool(options["temporal_mode"], f"{where}.temporal_mode"):
        raise MlmdmConfigError(f"{where}.temporal_mode (video) is not supported: ml-mdm released no video model")
    temporal_layers = options["num_temporal_attention_layers"]
    if temporal_layers is not None and any(parse_ints(temporal_layers, f"{where}.num_temporal_attention_layers")):
        raise MlmdmConfigError(f"{where}.num_temporal_attention_layers > 0 (temporal attention) is not supported")


def _check_skips(where: str, options: Mapping[str, Any], innermost: bool) -> None:
    """Only the innermost UNet runs mid blocks and embeds the pooled text, in ml-mdm as here."""
    skip_mid = parse_bool(options["skip_mid_blocks"], f"{where}.skip_mid_blocks")
    skip_cond = parse_bool(options["skip_cond_emb"], f"{where}.skip_cond_emb")
    if innermost:
        if skip_mid:
            raise MlmdmConfigError(f"{where}.skip_mid_blocks: the innermost UNet without mid blocks is not supported")
        if skip_cond:
            raise MlmdmConfigError(
                f"{where}.skip_cond_emb: an innermost UNet without the pooled-text embedding is not supported"
            )
    else:
        if not skip_mid:
            raise MlmdmConfigError(
                f"{where}.skip_mid_blocks=false: an outer UNet's mid blocks are never run by ml-mdm (the inner UNet "
                "replaces them) and are not supported"
            )
        if not skip_cond:
            raise MlmdmConfigError(
                f"{where}.skip_cond_emb=false: an outer UNet's own text projection is never used by ml-mdm "
                "(the innermost one is) and is not supported"
            )


def _nested_normalize(where: str, options: Mapping[str, Any], training: list[str]) -> bool:
    """The options of a NestedUNet around an inner one: whether it normalizes its input."""
    if parse_bool(options["skip_inner_unet_input"], f"{where}.skip_inner_unet_input"):
        raise MlmdmConfigError(f"{where}.skip_inner_unet_input (no in_adapter) is not supported")
    if parse_bool(options["interp_conditioning"], f"{where}.interp_conditioning"):
        raise MlmdmConfigError(f"{where}.interp_conditioning (unused extra layers) is not supported")
    if parse_bool(options["freeze_inner_unet"], f"{where}.freeze_inner_unet"):
        training.append(f"{where}.freeze_inner_unet=true (use stages[].freeze_inner in our trainer)")
    return not parse_bool(options["skip_normalization"], f"{where}.skip_normalization")


def _parse_level(where: str, raw: Mapping[str, Any], nested: bool, innermost: bool, training: list[str]) -> _Level:
    options = with_defaults(raw, NESTED_DEFAULTS if nested else UNET_DEFAULTS, where)
    resnet = with_defaults(options["resnet_config"], RESNET_DEFAULTS, f"{where}.resnet_config")

    channels = parse_ints(options["resolution_channels"], f"{where}.resolution_channels")
    if not channels or any(c <= 0 for c in channels):
        raise MlmdmConfigError(f"{where}.resolution_channels must list positive widths, got {channels}")
    stages = len(channels)
    res_blocks = _per_stage(options, "num_resnets_per_resolution", stages, where)
    attention_layers = _per_stage(options, "num_attention_layers", stages, where)
    attention_levels = parse_ints(options["attention_levels"], f"{where}.attention_levels")
    # ml-mdm tests `i in attention_levels` per resolution: other values have no effect.
    attention_stages = sorted({s for s in attention_levels if 0 <= s < stages})
    _refuse_unsupported_layers(where, options)

    groups = parse_int(resnet["num_groups_norm"], f"{where}.resnet_config.num_groups_norm")
    if groups is None or groups < 1:
        raise MlmdmConfigError(f"{where}.resnet_config.num_groups_norm must be positive, got {groups}")
    temporal_dim = parse_int(options["temporal_dim"], f"{where}.temporal_dim") or 4 * channels[0]
    if temporal_dim % 8:
        raise MlmdmConfigError(
            f"{where}.temporal_dim={temporal_dim} must be a multiple of 8 (ml-mdm cannot run otherwise)"
        )
    _check_skips(where, options, innermost)
    normalize = _nested_normalize(where, options, training) if nested else False

    dropout = parse_float(resnet["dropout"], f"{where}.resnet_config.dropout") or 0.0
    return _Level(
        channels=channels,
        res_blocks=res_blocks,
        attention_stages=attention_stages,
        attention_layers=attention_layers,
        groups=groups,
        dropout=dropout,
        ffn=parse_bool(resnet["use_attention_ffn"], f"{where}.resnet_config.use_attention_ffn"),
        micro=parse_micro(options["micro_conditioning"], f"{where}.micro_conditioning"),
        temporal_dim=temporal_dim,
        proj_dim=parse_int(options["conditioning_feature_proj_dim"], f"{where}.conditioning_feature_proj_dim") or -1,
        masked=parse_bool(options["masked_cross_attention"], f"{where}.masked_cross_attention"),
        normalize=normalize,
    )


def _named_text_dim(raw: Mapping[str, Any], chain: _Chain) -> tuple[str, int | None]:
    """(text_model, its width): known from the name, else the width the config declares, else None."""
    model = str(raw.get("text_model") or DEFAULT_TEXT_MODEL)
    if model in TEXT_ENCODER_DIMS:
        return model, TEXT_ENCODER_DIMS[model]
    for where, section in chain:
        dim = parse_int(section.get("conditioning_feature_dim", -1), f"{where}.conditioning_feature_dim")
        if dim and dim > 0:
            return model, dim
    return model, None


def _text_dim(
    raw: Mapping[str, Any], chain: _Chain, text_dim: int | None, checkpoint_dim: int | None, notes: list[str]
) -> int:
    """Width of the text encoder's token embeddings: given, read from the checkpoint, or from the config."""
    if text_dim is not None:
        if text_dim <= 0:
            raise MlmdmConfigError(f"text_dim must be positive, got {text_dim}")
        return text_dim
    model, named = _named_text_dim(raw, chain)
    if checkpoint_dim is not None:
        # The tensors are what the network was trained with; a YAML can be reused for another encoder.
        if named != checkpoint_dim:
            notes.append(
                f"the checkpoint's tensors take {checkpoint_dim}-wide text tokens but the config's text_model "
                f"{model!r} gives {named or 'an unknown width'}: using {checkpoint_dim}, from the checkpoint"
            )
        return checkpoint_dim
    if named is None:
        raise MlmdmConfigError(
            f"unknown text_model {model!r}: pass the width of its token embeddings (--text-dim); known encoders: "
            + ", ".join(TEXT_ENCODER_DIMS)
        )
    return named


def _parse_chain(raw: Mapping[str, Any], training: list[str]) -> tuple[_Chain, list[_Level]]:
    """The UNets, outermost first, checked against ``model`` and against each other."""
    chain = _unet_levels(raw["unet_config"])
    count = len(chain)
    if count > 4:
        raise MlmdmConfigError(f"unet_config nests {count} UNets; at most 4 levels are supported")
    model_name = raw.get("model", raw.get("vision_model"))
    if model_name is not None:
        if str(model_name) not in MODEL_LEVELS:
            raise MlmdmConfigError(f"model: {model_name!r} is not an ml-mdm image model ({', '.join(MODEL_LEVELS)})")
        if MODEL_LEVELS[str(model_name)] != count:
            raise MlmdmConfigError(
                f"model: {model_name} has {MODEL_LEVELS[str(model_name)]} level(s) but unet_config nests {count}"
            )
    parsed = [
        _parse_level(where, section, nested=index < count - 1, innermost=index == count - 1, training=training)
        for index, (where, section) in enumerate(chain)
    ]
    dims = {level.temporal_dim for level in parsed}
    if len(dims) > 1:
        raise MlmdmConfigError(
            f"every level must have the same temporal_dim (time embedding width), got {sorted(dims)}"
        )
    ratios = {2 ** (len(level.channels) - 1) for level in parsed[:-1]}
    if len(ratios) > 1:
        raise MlmdmConfigError(
            f"outer UNets with different numbers of resolutions (nesting ratios {sorted(ratios)}) are not supported"
        )
    return chain, parsed


def _check_text_widths(chain: _Chain, parsed: list[_Level], width: int, text_dim: int | None, notes: list[str]) -> None:
    """Every level cross-attends with the width the innermost UNet projects the text to."""
    inner = parsed[-1]
    cross_dim = inner.proj_dim if inner.proj_dim > 0 else width
    for (where, _), level in zip(chain[:-1], parsed[:-1], strict=True):
        if level.proj_dim > 0 and level.proj_dim != width:
            raise MlmdmConfigError(
                f"{where}.conditioning_feature_proj_dim={level.proj_dim}: ml-mdm hands this width to the inner UNets "
                f"as their text width, but the text encoder gives {width}; such a model cannot run"
            )
        attends = any(level.attention_layers[s] > 0 for s in level.attention_stages)
        level_cross = level.proj_dim if level.proj_dim > 0 else width
        if attends and level_cross != cross_dim:
            raise MlmdmConfigError(
                f"{where} cross-attends with width {level_cross} "
                f"but the innermost UNet projects the text to {cross_dim}"
            )
    for (where, section), level in zip(chain, parsed, strict=True):
        declared = parse_int(section.get("conditioning_feature_dim", -1), f"{where}.conditioning_feature_dim")
        # ml-mdm's constructors overwrite it with the projection width in saved arguments.
        if declared and declared > 0 and declared not in (width, level.proj_dim) and text_dim is None:
            notes.append(
                f"{where}.conditioning_feature_dim={declared} is replaced by the text encoder's width {width}, "
                "as in ml-mdm"
            )


def _model_config(parsed: list[_Level], width: int) -> ModelConfig:
    inner = parsed[-1]
    levels = [
        LevelConfig(
            channels=level.channels,
            res_blocks=level.res_blocks,
            attention_stages=level.attention_stages,
            attention_layers=level.attention_layers,
            attention_heads=8,
            attention_ffn=level.ffn,
            mid_attention=index == 0,  # only the innermost UNet has mid blocks
            dropout=level.dropout,
            norm_groups=level.groups,
            # ml-mdm's SelfAttention normalises with GroupNorm(32, C) whatever num_groups_norm says.
            attention_norm_groups=None if level.groups == _ATTENTION_GROUPS else _ATTENTION_GROUPS,
            normalize_input=level.normalize,
            micro_conditioning=level.micro,
        )
        for index, level in enumerate(reversed(parsed))  # ours lists levels innermost first
    ]
    try:
        return ModelConfig(
            levels=levels,
            time_embed_dim=inner.temporal_dim,
            text_dim=width,
            text_proj_dim=inner.proj_dim if inner.proj_dim > 0 else 0,
            text_attention_mask=inner.masked,
        )
    except ValueError as error:
        raise MlmdmConfigError(f"the ml-mdm model does not fit our architecture: {error}") from error


def model_from_mlmdm(
    raw: Mapping[str, Any],
    text_dim: int | None,
    notes: list[str],
    training: list[str],
    checkpoint_text_dim: int | None = None,
) -> ModelConfig:
    """Our model for ``raw["unet_config"]``; appends to ``notes`` and ``training``.

    ``text_dim`` overrides the text encoder's width, which otherwise comes from the
    checkpoint's tensors (``checkpoint_text_dim``, see :func:`checkpoint_text_dim`), else from
    ``text_model`` (or the config's declared width for an encoder not in TEXT_ENCODER_DIMS).
    """
    chain, parsed = _parse_chain(raw, training)
    width = _text_dim(raw, chain, text_dim, checkpoint_text_dim, notes)
    _check_text_widths(chain, parsed, width, text_dim, notes)
    return _model_config(parsed, width)


def checkpoint_text_dim(shapes: Mapping[str, Any]) -> int | None:
    """The token width the innermost UNet's tensors take (ml-mdm names): its ``lm_proj`` input, else ``cond_emb``'s.

    None for a model without text conditioning.
    """
    for layer in ("lm_proj", "cond_emb"):
        pattern = re.compile(rf"(inner_unet\.)*{layer}\.weight")
        keys = [key for key in shapes if pattern.fullmatch(key)]
        if keys:
            innermost = max(keys, key=lambda key: key.count("inner_unet."))
            shape = tuple(getattr(shapes[innermost], "shape", shapes[innermost]))
            return int(shape[1]) if len(shape) == 2 else None
    return None
