"""Convert Apple ml-mdm checkpoints and YAML configs into our checkpoint format.

    from matryoshka.interop.mlmdm import convert_mlmdm
    convert_mlmdm("vis_model.pth", "cc12m_256x256.yaml", "converted/mlmdm-256")

    from matryoshka.pipeline import load_pipeline
    pipe = load_pipeline("converted/mlmdm-256")   # model, process and config, ready to sample

The pieces, usable on their own:

* :func:`read_mlmdm_yaml` reads ml-mdm's YAML as ml-mdm does (PyYAML, the last of
  duplicated keys wins) and reports the duplicates;
* :func:`run_config_from_mlmdm` maps an ml-mdm config (a YAML mapping, or the ``args``
  saved in a checkpoint) to our :class:`RunConfig`, refusing every option that would make
  our model or sampler compute something different from ml-mdm;
* :func:`map_mlmdm_keys` checks a state dict's names and shapes against the model
  (without materialising tensors) and :func:`convert_state_dict` renames the tensors;
* :func:`convert_mlmdm` does it all and writes a checkpoint directory atomically.

docs/mlmdm.md describes the mapping, the sampling semantics and the differences.
"""

from __future__ import annotations

import difflib
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import ConfigError, dump_yaml
from ..config.run import DiffusionConfig, RunConfig, SampleConfig, TextConfig, TrainConfig
from ..data.config import DataConfig
from ..models.config import LevelConfig, ModelConfig
from ..checkpoints import fsync_path
from .mlmdm_io import (
    CheckpointFormatError,
    LoadedWeights,
    MlmdmError,
    UnsafeCheckpointError,
    read_weights,
    to_plain,
)
from .mlmdm_keys import from_mlmdm_key, to_mlmdm_key

__all__ = [
    "MlmdmError",
    "MlmdmConfigError",
    "MlmdmMismatchError",
    "UnsafeCheckpointError",
    "CheckpointFormatError",
    "MlmdmConversion",
    "ConversionResult",
    "TEXT_ENCODER_DIMS",
    "read_mlmdm_yaml",
    "run_config_from_mlmdm",
    "expected_shapes",
    "map_mlmdm_keys",
    "convert_state_dict",
    "convert_mlmdm",
]


class MlmdmConfigError(MlmdmError):
    """An ml-mdm option we cannot reproduce (or an invalid ml-mdm config)."""


class MlmdmMismatchError(MlmdmError):
    """The checkpoint's tensors do not fit the model its config describes."""


# Width of the token embeddings of the text encoders ml-mdm can name in ``text_model``.
# ml-mdm overwrites ``conditioning_feature_dim`` with this width when it builds the model.
TEXT_ENCODER_DIMS = {
    "google/flan-t5-small": 512,
    "google/flan-t5-base": 768,
    "google/flan-t5-large": 1024,
    "google/flan-t5-xl": 2048,
    "google/flan-t5-xxl": 4096,
    "google/t5-v1_1-small": 512,
    "google/t5-v1_1-base": 768,
    "google/t5-v1_1-large": 1024,
    "google/t5-v1_1-xl": 2048,
    "google/t5-v1_1-xxl": 4096,
}

# ------------------------------------------------------------------ ml-mdm's option names and defaults
# (the fields of its UNetConfig / NestedUNetConfig / ResNetConfig / SamplerConfig /
# DiffusionConfig / NestedDiffusionConfig / ReaderConfig dataclasses and their defaults)

_UNET_DEFAULTS: dict[str, Any] = {
    "num_resnets_per_resolution": "2",
    "temporal_dim": None,
    "attention_levels": "2,3",
    "num_attention_layers": "1",
    "num_temporal_attention_layers": None,
    "conditioning_feature_dim": -1,
    "conditioning_feature_proj_dim": -1,
    "num_lm_head_layers": 0,
    "masked_cross_attention": 1,
    "resolution_channels": "128,256,256,512,1024",
    "skip_mid_blocks": False,
    "skip_cond_emb": False,
    "nesting": False,
    "micro_conditioning": None,
    "temporal_mode": False,
    "temporal_spatial_ds": False,
    "temporal_positional_encoding": False,
    "resnet_config": {},
}
_NESTED_DEFAULTS: dict[str, Any] = {
    **_UNET_DEFAULTS,
    "skip_mid_blocks": True,
    "skip_cond_emb": True,
    "inner_config": None,
    "skip_inner_unet_input": False,
    "skip_normalization": False,
    "initialize_inner_with_pretrained": None,
    "freeze_inner_unet": False,
    "interp_conditioning": False,
}
_RESNET_DEFAULTS: dict[str, Any] = {
    "num_channels": -1,
    "output_channels": -1,
    "num_groups_norm": 32,
    "dropout": 0.0,
    "use_attention_ffn": False,
}
_SAMPLER_DEFAULTS: dict[str, Any] = {
    "num_diffusion_steps": 32,
    "reproject_signal": False,
    "schedule_type": "DDPM",
    "prediction_type": "DDPM",
    "loss_target_type": None,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "threshold_function": "CLIP",
    "rescale_schedule": 1.0,
    "rescale_signal": None,
    "schedule_shifted": False,
    "schedule_shifted_power": 1,
}
_DIFFUSION_DEFAULTS: dict[str, Any] = {
    "sampler_config": {},
    "model_output_scale": 0,
    "use_vdm_loss_weights": True,
}
_NESTED_DIFFUSION_DEFAULTS: dict[str, Any] = {
    **_DIFFUSION_DEFAULTS,
    "use_double_loss": False,
    "multi_res_weights": None,
    "no_use_residual": False,
    "use_random_interp": False,
    "mixed_ratio": None,
    "random_downsample": False,
    "average_downsample": False,
    "mid_downsample": False,
}
_READER_TEXT_DEFAULTS: dict[str, Any] = {
    "max_caption_length": -1,
    "max_token_length": -1,
    "prepad_caption_with_space": True,
    "use_tokenizer_scores": True,
    "prepad_bos": False,
    "append_eos": True,
    "padding_token": "<pad>",
    "pad_to_max_length": False,
}
_MODEL_LEVELS = {"unet": 1, "nested_unet": 2, "nested2_unet": 3, "nested3_unet": 4, "nested4_unet": 5}
_SCHEDULES = {"DEEPFLOYD": "squaredcos", "COSINE": "logsnr_cosine", "DDPM": "linear"}
_PREDICTIONS = {"V_PREDICTION": "v", "DDPM": "eps", "DDIM": "eps"}
_THRESHOLDS = {
    # ml-mdm threshold_function -> (clip_x0, dynamic percentile) of our samplers
    "CLIP": (True, None),
    "NONE": (False, None),
    "DYNAMIC": (True, 0.995),
    "DYNAMIC_IF": (True, 0.95),
}
# ml-mdm's web demo: 50 / 100 / 250 steps for 64 / 256 / 1024 pixels, guidance 7.5.
_DEMO_STEPS = {64: 50, 256: 100, 1024: 250}
_DEMO_GUIDANCE = 7.5


# ------------------------------------------------------------------ YAML


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
            if key in seen:
                self.duplicates.append(f"'{key}' (line {line} replaces line {seen[key]})")
            try:
                seen[key] = line
            except TypeError:
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


# ------------------------------------------------------------------ value parsing


def _ints(value: Any, where: str) -> list[int]:
    """ml-mdm list options: a YAML list, one number, or a comma-separated string."""
    if value is None:
        return []
    if isinstance(value, bool):
        raise MlmdmConfigError(f"{where}: expected integers, got {value!r}")
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            return [int(p) for p in parts]
        except ValueError:
            raise MlmdmConfigError(f"{where}: expected comma-separated integers, got {value!r}") from None
    if isinstance(value, (list, tuple)):
        out = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (int, float)) or int(item) != item:
                raise MlmdmConfigError(f"{where}: expected integers, got {value!r}")
            out.append(int(item))
        return out
    raise MlmdmConfigError(f"{where}: expected integers, got {value!r}")


def _int(value: Any, where: str) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MlmdmConfigError(f"{where}: expected an integer, got {value!r}") from None
    if isinstance(value, bool) or not number.is_integer():
        raise MlmdmConfigError(f"{where}: expected an integer, got {value!r}")
    return int(number)


def _float(value: Any, where: str) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(value, bool):
        raise MlmdmConfigError(f"{where}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise MlmdmConfigError(f"{where}: expected a number, got {value!r}") from None


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise MlmdmConfigError(f"{where}: expected true or false, got {value!r}")


def _enum(value: Any, choices: Mapping[str, Any], where: str) -> str:
    name = str(value).strip().upper() if value is not None else ""
    if name not in choices:
        raise MlmdmConfigError(
            f"{where}: {value!r} is not supported (supported: {', '.join(choices)})"
        )
    return name


def _micro(value: Any, where: str) -> dict[str, float]:
    """``'scale:64'`` or ``'scale:64,watermark_score:0'`` -> ``{"scale": 64.0, ...}``."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return {}
    out: dict[str, float] = {}
    for item in str(value).split(","):
        key, sep, default = item.partition(":")
        try:
            out[key.strip()] = float(default)
        except ValueError:
            raise MlmdmConfigError(f"{where}: expected 'NAME:DEFAULT[,NAME:DEFAULT]', got {value!r}") from None
        if not sep or not key.strip():
            raise MlmdmConfigError(f"{where}: expected 'NAME:DEFAULT[,NAME:DEFAULT]', got {value!r}")
    return out


def _ratios(value: Any, where: str) -> list[float] | None:
    """ml-mdm ``'a:b:c'`` strings; None when unset."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    try:
        return [float(x) for x in str(value).split(":")]
    except ValueError:
        raise MlmdmConfigError(f"{where}: expected numbers separated by ':', e.g. '2:1', got {value!r}") from None


def _with_defaults(section: Any, defaults: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Fill ml-mdm defaults in; unknown keys are an error (they are not silently dropped)."""
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise MlmdmConfigError(f"{where} must be a mapping, got {type(section).__name__}")
    unknown = [key for key in section if key not in defaults]
    if unknown:
        hints = []
        for key in unknown:
            near = difflib.get_close_matches(str(key), list(defaults), n=1)
            hints.append(f"'{key}'" + (f" (did you mean '{near[0]}'?)" if near else ""))
        raise MlmdmConfigError(
            f"{where} has option{'s' if len(unknown) > 1 else ''} that ml-mdm does not define: {', '.join(hints)}"
        )
    return {**defaults, **section}


# ------------------------------------------------------------------ the mapping


@dataclass
class MlmdmConversion:
    """An ml-mdm config mapped to ours, and what is not part of RunConfig."""

    config: RunConfig
    sampling: dict[str, Any]
    """ml-mdm's sampling semantics expressed as options of our samplers (see docs/mlmdm.md)."""
    text_encoder: dict[str, Any]
    """The text encoder and tokenisation the model was trained with."""
    notes: list[str] = field(default_factory=list)
    """Duplicated or ignored options and tolerated training differences."""


@dataclass
class _Level:
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


def _unet_levels(unet: Any) -> list[tuple[str, Mapping[str, Any]]]:
    """The chain ``unet_config -> inner_config -> ...`` as (path, mapping), outermost first."""
    chain: list[tuple[str, Mapping[str, Any]]] = []
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


def _parse_level(where: str, raw: Mapping[str, Any], nested: bool, innermost: bool,
                 training: list[str]) -> _Level:
    options = _with_defaults(raw, _NESTED_DEFAULTS if nested else _UNET_DEFAULTS, where)
    resnet = _with_defaults(options["resnet_config"], _RESNET_DEFAULTS, f"{where}.resnet_config")

    channels = _ints(options["resolution_channels"], f"{where}.resolution_channels")
    if not channels or any(c <= 0 for c in channels):
        raise MlmdmConfigError(f"{where}.resolution_channels must list positive widths, got {channels}")
    stages = len(channels)

    def per_stage(name: str) -> list[int]:
        values = _ints(options[name], f"{where}.{name}")
        if len(values) == 1:
            values = values * stages
        if len(values) != stages:
            raise MlmdmConfigError(f"{where}.{name} needs one value or one per resolution ({stages}), got {values}")
        return values

    res_blocks = per_stage("num_resnets_per_resolution")
    attention_layers = per_stage("num_attention_layers")
    attention_levels = _ints(options["attention_levels"], f"{where}.attention_levels")
    # ml-mdm tests `i in attention_levels` per resolution: other values have no effect.
    attention_stages = sorted({s for s in attention_levels if 0 <= s < stages})

    if _int(options["num_lm_head_layers"], f"{where}.num_lm_head_layers"):
        raise MlmdmConfigError(f"{where}.num_lm_head_layers > 0 (self-attention layers on the text tokens) is not supported")
    if _bool(options["temporal_mode"], f"{where}.temporal_mode"):
        raise MlmdmConfigError(f"{where}.temporal_mode (video) is not supported: ml-mdm released no video model")
    temporal_layers = options["num_temporal_attention_layers"]
    if temporal_layers is not None and any(_ints(temporal_layers, f"{where}.num_temporal_attention_layers")):
        raise MlmdmConfigError(f"{where}.num_temporal_attention_layers > 0 (temporal attention) is not supported")

    groups = _int(resnet["num_groups_norm"], f"{where}.resnet_config.num_groups_norm")
    has_attention = any(attention_layers[s] > 0 for s in attention_stages) or innermost
    if has_attention and groups != 32:
        raise MlmdmConfigError(
            f"{where}.resnet_config.num_groups_norm={groups}: ml-mdm's attention layers always use 32 groups, "
            "ours use the level's num_groups_norm; only 32 reproduces ml-mdm for a level with attention"
        )

    first = channels[0]
    temporal_dim = _int(options["temporal_dim"], f"{where}.temporal_dim") or 4 * first
    if temporal_dim % 8:
        raise MlmdmConfigError(f"{where}.temporal_dim={temporal_dim} must be a multiple of 8 (ml-mdm cannot run otherwise)")

    skip_mid = _bool(options["skip_mid_blocks"], f"{where}.skip_mid_blocks")
    skip_cond = _bool(options["skip_cond_emb"], f"{where}.skip_cond_emb")
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
    normalize = False
    if nested:
        if _bool(options["skip_inner_unet_input"], f"{where}.skip_inner_unet_input"):
            raise MlmdmConfigError(f"{where}.skip_inner_unet_input (no in_adapter) is not supported")
        if _bool(options["interp_conditioning"], f"{where}.interp_conditioning"):
            raise MlmdmConfigError(f"{where}.interp_conditioning (unused extra layers) is not supported")
        if _bool(options["freeze_inner_unet"], f"{where}.freeze_inner_unet"):
            training.append(f"{where}.freeze_inner_unet=true (use stages[].freeze_inner in our trainer)")
        normalize = not _bool(options["skip_normalization"], f"{where}.skip_normalization")

    dropout = _float(resnet["dropout"], f"{where}.resnet_config.dropout") or 0.0
    return _Level(
        channels=channels,
        res_blocks=res_blocks,
        attention_stages=attention_stages,
        attention_layers=attention_layers,
        groups=groups,
        dropout=dropout,
        ffn=_bool(resnet["use_attention_ffn"], f"{where}.resnet_config.use_attention_ffn"),
        micro=_micro(options["micro_conditioning"], f"{where}.micro_conditioning"),
        temporal_dim=temporal_dim,
        proj_dim=_int(options["conditioning_feature_proj_dim"], f"{where}.conditioning_feature_proj_dim") or -1,
        masked=_bool(options["masked_cross_attention"], f"{where}.masked_cross_attention"),
        normalize=normalize,
    )


def _text_dim(raw: Mapping[str, Any], chain: list[tuple[str, Mapping[str, Any]]], text_dim: int | None) -> int:
    if text_dim is not None:
        if text_dim <= 0:
            raise MlmdmConfigError(f"text_dim must be positive, got {text_dim}")
        return text_dim
    model = raw.get("text_model")
    if model is None:
        model = "google/flan-t5-xl"  # ml-mdm's default --text-model
    if str(model) in TEXT_ENCODER_DIMS:
        return TEXT_ENCODER_DIMS[str(model)]
    for where, section in chain:
        dim = _int(section.get("conditioning_feature_dim", -1), f"{where}.conditioning_feature_dim")
        if dim and dim > 0:
            return dim
    raise MlmdmConfigError(
        f"unknown text_model {model!r}: pass the width of its token embeddings (--text-dim); known encoders: "
        + ", ".join(TEXT_ENCODER_DIMS)
    )


def _section(raw: Mapping[str, Any], name: str) -> Any:
    value = raw.get(name)
    return {} if value is None else value


def run_config_from_mlmdm(
    raw: Mapping[str, Any],
    *,
    text_dim: int | None = None,
    resolution: int | None = None,
    strict_training: bool = True,
    name: str | None = None,
) -> MlmdmConversion:
    """Map an ml-mdm config (YAML mapping or a checkpoint's saved ``args``) to a RunConfig.

    Options that change the network's output or the sampler are reproduced exactly or
    refused with :class:`MlmdmConfigError`. Options that only change training (loss
    weighting, freezing) and that our trainer cannot reproduce are refused too unless
    ``strict_training=False``, in which case they are listed in the notes.
    """
    if not isinstance(raw, Mapping):
        raise MlmdmConfigError(f"an ml-mdm config must be a mapping, got {type(raw).__name__}")
    raw = {str(key).replace("-", "_"): value for key, value in raw.items()}
    notes: list[str] = []
    training: list[str] = []

    if "unet_config" not in raw:
        raise MlmdmConfigError("the ml-mdm config has no 'unet_config' section (is it a model config such as cc12m_256x256.yaml?)")
    if raw.get("categorical_conditioning") and _bool(raw["categorical_conditioning"], "categorical_conditioning"):
        raise MlmdmConfigError("categorical_conditioning (class labels as one-hot text) is not supported")

    # ---- model
    chain = _unet_levels(raw["unet_config"])
    count = len(chain)
    if count > 4:
        raise MlmdmConfigError(f"unet_config nests {count} UNets; at most 4 levels are supported")
    model_name = raw.get("model", raw.get("vision_model"))
    if model_name is not None:
        if str(model_name) not in _MODEL_LEVELS:
            raise MlmdmConfigError(f"model: {model_name!r} is not an ml-mdm image model ({', '.join(_MODEL_LEVELS)})")
        if _MODEL_LEVELS[str(model_name)] != count:
            raise MlmdmConfigError(
                f"model: {model_name} has {_MODEL_LEVELS[str(model_name)]} level(s) but unet_config nests {count}"
            )
    parsed = [
        _parse_level(where, section, nested=index < count - 1, innermost=index == count - 1, training=training)
        for index, (where, section) in enumerate(chain)
    ]  # outermost first
    inner = parsed[-1]
    dims = {level.temporal_dim for level in parsed}
    if len(dims) > 1:
        raise MlmdmConfigError(f"every level must have the same temporal_dim (time embedding width), got {sorted(dims)}")
    ratios = {2 ** (len(level.channels) - 1) for level in parsed[:-1]}
    if len(ratios) > 1:
        raise MlmdmConfigError(
            f"outer UNets with different numbers of resolutions (nesting ratios {sorted(ratios)}) are not supported"
        )

    width = _text_dim(raw, chain, text_dim)
    cross_dim = inner.proj_dim if inner.proj_dim > 0 else width
    for (where, _), level in zip(chain[:-1], parsed[:-1]):
        if level.proj_dim > 0 and level.proj_dim != width:
            raise MlmdmConfigError(
                f"{where}.conditioning_feature_proj_dim={level.proj_dim}: ml-mdm hands this width to the inner UNets "
                f"as their text width, but the text encoder gives {width}; such a model cannot run"
            )
        attends = any(level.attention_layers[s] > 0 for s in level.attention_stages)
        level_cross = level.proj_dim if level.proj_dim > 0 else width
        if attends and level_cross != cross_dim:
            raise MlmdmConfigError(
                f"{where} cross-attends with width {level_cross} but the innermost UNet projects the text to {cross_dim}"
            )
    for (where, section), level in zip(chain, parsed):
        declared = _int(section.get("conditioning_feature_dim", -1), f"{where}.conditioning_feature_dim")
        # (ml-mdm's constructors overwrite it with the projection width in saved arguments)
        if declared and declared > 0 and declared not in (width, level.proj_dim) and text_dim is None:
            notes.append(f"{where}.conditioning_feature_dim={declared} is replaced by the text encoder's width {width}, as in ml-mdm")

    levels = []
    for index, level in enumerate(reversed(parsed)):  # innermost first
        innermost = index == 0
        levels.append(
            LevelConfig(
                channels=level.channels,
                res_blocks=level.res_blocks,
                attention_stages=level.attention_stages,
                attention_layers=level.attention_layers,
                attention_heads=8,
                attention_ffn=level.ffn,
                mid_attention=innermost,
                dropout=level.dropout,
                norm_groups=level.groups,
                normalize_input=level.normalize,
                micro_conditioning=level.micro,
            )
        )
    try:
        model = ModelConfig(
            levels=levels,
            time_embed_dim=inner.temporal_dim,
            text_dim=width,
            text_proj_dim=inner.proj_dim if inner.proj_dim > 0 else 0,
            text_attention_mask=inner.masked,
        )
    except ValueError as error:
        raise MlmdmConfigError(f"the ml-mdm model does not fit our architecture: {error}") from error

    # ---- diffusion
    nested = count > 1
    diffusion_raw = _section(raw, "diffusion_config")
    if not isinstance(diffusion_raw, Mapping):
        raise MlmdmConfigError("diffusion_config must be a mapping")
    diffusion_raw = dict(diffusion_raw)
    for key in ("mixed_ratio", "multi_res_weights", "use_double_loss"):
        # (saved `args` hold every diffusion_config field, so its default there means "not set")
        if key in raw and raw[key] != _NESTED_DIFFUSION_DEFAULTS[key]:
            current = diffusion_raw.get(key, _NESTED_DIFFUSION_DEFAULTS[key])
            if current != _NESTED_DIFFUSION_DEFAULTS[key] and current != raw[key]:
                raise MlmdmConfigError(f"{key} is given both at the top level and in diffusion_config with different values")
            diffusion_raw[key] = raw[key]
            notes.append(
                f"top-level {key}={raw[key]!r} applied to diffusion_config (ml-mdm's own parser, simple-parsing, "
                "ignores top-level keys of a nested section, so ml-mdm itself trained without it)"
            )
    diffusion_defaults = _NESTED_DIFFUSION_DEFAULTS if nested else _DIFFUSION_DEFAULTS
    if not nested:
        for key in set(diffusion_raw) - set(_DIFFUSION_DEFAULTS):
            if key in _NESTED_DIFFUSION_DEFAULTS:
                notes.append(f"diffusion_config.{key} only applies to nested models: ignored")
                diffusion_raw.pop(key)
    diffusion = _with_defaults(diffusion_raw, diffusion_defaults, "diffusion_config")
    sampler = _with_defaults(diffusion["sampler_config"], _SAMPLER_DEFAULTS, "diffusion_config.sampler_config")
    where = "diffusion_config.sampler_config"

    steps = _int(sampler["num_diffusion_steps"], f"{where}.num_diffusion_steps")
    if steps is None or steps < 2:
        raise MlmdmConfigError(f"{where}.num_diffusion_steps must be at least 2, got {steps}")
    schedule_type = _enum(sampler["schedule_type"], _SCHEDULES, f"{where}.schedule_type")
    if schedule_type == "DDPM":
        beta_start = _float(sampler["beta_start"], f"{where}.beta_start")
        beta_end = _float(sampler["beta_end"], f"{where}.beta_end")
        if not (math.isclose(beta_start, 1e-4) and math.isclose(beta_end, 0.02)):
            raise MlmdmConfigError(f"{where}: DDPM betas other than 0.0001..0.02 are not supported (got {beta_start}..{beta_end})")
    prediction = _PREDICTIONS[_enum(sampler["prediction_type"], _PREDICTIONS, f"{where}.prediction_type")]
    loss_target = prediction
    if sampler["loss_target_type"] is not None:
        try:
            loss_target = _PREDICTIONS[_enum(sampler["loss_target_type"], _PREDICTIONS, f"{where}.loss_target_type")]
        except MlmdmConfigError as error:
            training.append(f"{error} (ml-mdm cannot train with it either)")
    rescale_schedule = _float(sampler["rescale_schedule"], f"{where}.rescale_schedule")
    if rescale_schedule is not None and rescale_schedule > 1:
        raise MlmdmConfigError(f"{where}.rescale_schedule={rescale_schedule} (a shifted base schedule) is not supported")
    rescale_signal = _float(sampler["rescale_signal"], f"{where}.rescale_signal")
    shifted = _bool(sampler["schedule_shifted"], f"{where}.schedule_shifted")
    shift_power = _float(sampler["schedule_shifted_power"], f"{where}.schedule_shifted_power")
    if shift_power is None:
        shift_power = 1.0
    if nested and not shifted:
        raise MlmdmConfigError(
            f"{where}.schedule_shifted=false: ml-mdm then divides each level's signal by its scale instead of "
            "shifting the noise schedule; this is not supported"
        )
    if rescale_signal and rescale_signal != 1:
        if nested:
            notes.append(f"{where}.rescale_signal={rescale_signal} is unused by ml-mdm for shifted nested models: ignored")
        else:
            raise MlmdmConfigError(f"{where}.rescale_signal={rescale_signal} (signal scaling) is not supported")
    if _bool(sampler["reproject_signal"], f"{where}.reproject_signal"):
        notes.append(f"{where}.reproject_signal is unused by ml-mdm: ignored")
    threshold = _enum(sampler["threshold_function"], _THRESHOLDS, f"{where}.threshold_function")

    output_scale = _float(diffusion["model_output_scale"], "diffusion_config.model_output_scale")
    if output_scale:
        raise MlmdmConfigError(f"diffusion_config.model_output_scale={output_scale} (tanh-squashed outputs) is not supported")
    if _bool(diffusion["use_vdm_loss_weights"], "diffusion_config.use_vdm_loss_weights"):
        training.append("diffusion_config.use_vdm_loss_weights=true (VDM loss weighting; ml-mdm's default)")

    level_weights: list[float] = []
    loss_on_all_levels = True
    mixed_ratio = None
    if nested:
        if not _bool(diffusion["no_use_residual"], "diffusion_config.no_use_residual"):
            raise MlmdmConfigError(
                "diffusion_config.no_use_residual=false (ml-mdm's default): the residual mode adds an upsampled "
                "low-resolution prediction to the high one; it is a dead path in ml-mdm (it cannot run) and is not "
                "supported. Released configs set no_use_residual: true"
            )
        for key in ("use_random_interp", "random_downsample", "average_downsample", "mid_downsample"):
            if _bool(diffusion[key], f"diffusion_config.{key}"):
                notes.append(f"diffusion_config.{key} is unused by ml-mdm: ignored")
        loss_on_all_levels = _bool(diffusion["use_double_loss"], "diffusion_config.use_double_loss")
        weights = _ratios(diffusion["multi_res_weights"], "diffusion_config.multi_res_weights")
        if weights is not None:
            if not loss_on_all_levels:
                training.append("multi_res_weights without use_double_loss (ml-mdm asserts against it)")
            if len(weights) != count:
                training.append(f"multi_res_weights {weights} needs one weight per level ({count})")
            elif any(w < 0 for w in weights):
                raise MlmdmConfigError(f"multi_res_weights must be non-negative, got {weights}")
            else:
                level_weights = weights
        parts = _ratios(diffusion["mixed_ratio"], "diffusion_config.mixed_ratio")
        if parts is not None:
            if len(parts) < count or any(p < 0 for p in parts) or sum(parts) <= 0:
                training.append(f"mixed_ratio {diffusion['mixed_ratio']!r} needs one non-negative part per level ({count})")
            else:
                cumulative = [sum(parts[: i + 1]) / sum(parts) for i in range(len(parts))][:count]
                if any(abs(c - 1.0) > 1e-9 for c in cumulative[1:]):
                    training.append(
                        f"mixed_ratio {diffusion['mixed_ratio']!r} subsamples levels below the top one; "
                        "only the top level can be subsampled here"
                    )
                elif cumulative[0] < 1.0 - 1e-9:
                    mixed_ratio = cumulative[0]

    # ---- data and training hints
    reader = _section(raw, "reader_config")
    if not isinstance(reader, Mapping):
        raise MlmdmConfigError("reader_config must be a mapping")
    sample_size = _int(raw.get("sample_image_size"), "sample_image_size")
    reader_size = _int(reader.get("image_size"), "reader_config.image_size")
    top = resolution or (sample_size if sample_size and sample_size > 0 else None) or (
        reader_size if reader_size and reader_size > 0 else None
    )
    if top is None:
        raise MlmdmConfigError("the config gives no image size (sample_image_size or reader_config.image_size): pass the resolution")
    if sample_size and reader_size and sample_size > 0 and reader_size > 0 and sample_size != reader_size and not resolution:
        notes.append(f"sample_image_size={sample_size} differs from reader_config.image_size={reader_size}: using {sample_size}")
    data = DataConfig(
        source="mlmdm-tsv",
        path="training_0.tsv",
        resolution=top,
        captions=True,
        crop="random" if reader.get("random_crop") is True else "center",
    )
    train_defaults = TrainConfig()
    train = TrainConfig(
        lr=_float(raw.get("lr"), "lr") or train_defaults.lr,
        warmup_steps=_int(raw.get("warmup_steps"), "warmup_steps") or train_defaults.warmup_steps,
        grad_clip=_float(raw.get("gradient_clip_norm"), "gradient_clip_norm") or train_defaults.grad_clip,
        batch_size=_int(raw.get("batch_size"), "batch_size") or train_defaults.batch_size,
        grad_accum=_int(raw.get("num_gradient_accumulations"), "num_gradient_accumulations") or 1,
        ema_decay=0.9999,  # ml-mdm's ModelEma default
    )
    loss_factor = _float(raw.get("loss_factor"), "loss_factor")
    if loss_factor is not None and loss_factor != 1:
        training.append(f"loss_factor={loss_factor}")
    sample_steps = _DEMO_STEPS.get(top, 100)
    clip_x0, dynamic = _THRESHOLDS[threshold]
    sampling = {
        "sampler": "ddim",
        "eta": 0.0,
        "steps": sample_steps,
        "guidance": _DEMO_GUIDANCE,
        "negative_prompt": "",
        "threshold_function": threshold,
        "clip_x0": clip_x0,
        "dynamic_threshold": dynamic,
    }
    if threshold == "DYNAMIC_IF":
        notes.append("threshold_function DYNAMIC_IF caps the threshold at 1.5 in ml-mdm; our dynamic thresholding has no cap")

    text_model = str(raw.get("text_model") or "google/flan-t5-xl")
    max_tokens = _int(reader.get("max_token_length"), "reader_config.max_token_length")
    if not max_tokens or max_tokens <= 0:
        max_tokens = 128
        notes.append("reader_config.max_token_length is unset: captions are cut at 128 tokens")
    # ml-mdm's own tokenisation of T5's vocabulary (see docs/text.md).
    text = TextConfig(encoder=text_model, max_length=max_tokens, mlmdm_compat=True)

    try:
        config = RunConfig(
            run_dir=f"runs/{name or f'mlmdm-{top}'}",
            model=model,
            diffusion=DiffusionConfig(
                schedule=_SCHEDULES[schedule_type],
                num_steps=steps,
                shift_power=shift_power,
                prediction=prediction,
                loss_target=loss_target,
                level_weights=level_weights,
                loss_on_all_levels=loss_on_all_levels,
                mixed_ratio=mixed_ratio,
            ),
            data=data,
            train=train,
            sample=SampleConfig(sampler="ddim", steps=sample_steps, spacing="mlmdm", num=4, guidance=_DEMO_GUIDANCE),
            text=text,
        )
    except (ValueError, ConfigError) as error:
        raise MlmdmConfigError(f"the ml-mdm config does not give a valid run config: {error}") from error

    reader_text = {key: reader.get(key, default) for key, default in _READER_TEXT_DEFAULTS.items()}
    text_encoder = {
        "model": text_model,
        "dim": width,
        "zero_padding_embeddings": True,
        "attention_mask_in_cross_attention": inner.masked,
        **reader_text,
    }

    if training:
        if strict_training:
            raise MlmdmConfigError(
                "training options our trainer cannot reproduce: " + "; ".join(training)
                + ". Sampling is unaffected: pass --ignore-training-options (strict_training=False) to convert anyway"
            )
        notes.extend(f"training differs from ml-mdm: {item}" for item in training)
    return MlmdmConversion(config, sampling, text_encoder, notes)


# ------------------------------------------------------------------ tensors


def expected_shapes(model_config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our model's state-dict names and shapes, computed on the meta device (no memory)."""
    from ..models import NestedUNet

    with torch.device("meta"):
        model = NestedUNet(model_config)
    return {name: tuple(value.shape) for name, value in model.state_dict().items()}


def _shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


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
        lines = [f"{source} does not match the model described by the config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong), ("duplicate", clashes)):
            if items:
                shown = "\n    ".join(items[:12])
                more = f"\n    ... and {len(items) - 12} more" if len(items) > 12 else ""
                lines.append(f"  {title} ({len(items)}):\n    {shown}{more}")
        lines.append("  (names are ml-mdm's; check that the config belongs to this checkpoint)")
        raise MlmdmMismatchError("\n".join(lines))
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


# ------------------------------------------------------------------ writing


@dataclass
class ConversionResult:
    out: Path
    config: RunConfig
    num_parameters: int
    step: int
    notes: list[str]
    sampling: dict[str, Any]
    files: list[str]


def _prepare_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise MlmdmError(f"output path {out} exists and is not a directory")
        if any(out.iterdir()):
            raise MlmdmError(f"output directory {out} already exists and is not empty; choose a new --out")
    if not out.parent.exists():
        raise FileNotFoundError(f"parent directory of --out does not exist: {out.parent}")


def convert_mlmdm(
    checkpoint: str | os.PathLike,
    config: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    state_dict_only: bool = False,
    text_dim: int | None = None,
    resolution: int | None = None,
    strict_training: bool = True,
) -> ConversionResult:
    """Convert an ml-mdm checkpoint (``vis_model.pth``) and its YAML config into ``out``.

    ``out`` receives our checkpoint directory: ``model.safetensors`` and
    ``ema.safetensors`` (the same weights, hard-linked when possible: ml-mdm's
    ``vis_model`` files hold the EMA), ``state.pt`` (step, number of levels and a record
    of the source: ml-mdm options, sampling settings, text encoder, notes) and
    ``config.yaml``. With ``state_dict_only`` only ``model.safetensors`` and
    ``config.yaml`` are written (weights for your own code; not a loadable checkpoint).
    Without ``config`` the ``args`` saved in the checkpoint are used.

    Everything is written to a temporary directory next to ``out`` and renamed at the
    end, so a failure leaves nothing behind.
    """
    from safetensors.torch import save_file

    checkpoint = Path(checkpoint).expanduser()
    out = Path(out).expanduser()
    if not checkpoint.is_file():
        raise FileNotFoundError(f"ml-mdm checkpoint not found: {checkpoint}")
    _prepare_out(out)
    notes: list[str] = []
    raw: Mapping[str, Any] | None = None
    if config is not None:
        raw, notes = read_mlmdm_yaml(config)

    loaded: LoadedWeights = read_weights(checkpoint)
    notes.extend(loaded.notes)
    if raw is None:
        if not loaded.args:
            raise MlmdmConfigError(
                f"{checkpoint} holds no ml-mdm training arguments; pass its YAML config (--config cc12m_256x256.yaml)"
            )
        raw = loaded.args
        config_source = f"arguments saved in {checkpoint.name}"
    else:
        config_source = str(Path(config).expanduser())
    name = Path(config).stem if config is not None else checkpoint.stem
    conversion = run_config_from_mlmdm(
        raw, text_dim=text_dim, resolution=resolution, strict_training=strict_training, name=f"{name}-converted"
    )
    notes.extend(conversion.notes)
    tensors = convert_state_dict(loaded.tensors, conversion.config.model, str(checkpoint))

    step = loaded.extras.get("batch_num")
    step = int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else 0
    num_levels = conversion.config.model.num_levels
    source = {
        "format": "ml-mdm",
        "checkpoint": str(checkpoint),
        "checkpoint_kind": loaded.kind,
        "config": config_source,
        "extras": to_plain(loaded.extras),
        "inert_records": list(loaded.records),
        "sampling": conversion.sampling,
        "text_encoder": conversion.text_encoder,
        "notes": list(notes),
        "mlmdm_config": to_plain(dict(raw)),
    }

    tmp = out.parent / f".{out.name}.converting-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = []
    try:
        metadata = {"format": "matryoshka", "step": str(step), "source": "ml-mdm"}
        save_file(tensors, tmp / "model.safetensors", metadata)
        files.append("model.safetensors")
        if not state_dict_only:
            try:
                os.link(tmp / "model.safetensors", tmp / "ema.safetensors")
            except OSError:
                shutil.copyfile(tmp / "model.safetensors", tmp / "ema.safetensors")
            torch.save({"step": step, "num_levels": num_levels, "source": source}, tmp / "state.pt")
            files += ["ema.safetensors", "state.pt"]
        dump_yaml(conversion.config, tmp / "config.yaml")
        files.append("config.yaml")
        for file in files:
            fsync_path(tmp / file)
        if out.exists():
            out.rmdir()  # checked empty above
        tmp.rename(out)
        fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConversionResult(
        out=out,
        config=conversion.config,
        num_parameters=sum(t.numel() for t in tensors.values()),
        step=step,
        notes=notes,
        sampling=conversion.sampling,
        files=files,
    )
