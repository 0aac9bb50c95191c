"""The diffusers community port of Matryoshka Diffusion Models -> our checkpoint directory.

diffusers' ``examples/community/matryoshka.py`` re-implements ml-mdm's NestedUNet in its
own module tree (``MatryoshkaUNet2DConditionModel`` inside ``NestedUNet2DConditionModel``)
and publishes one full model per nesting level as ``unet/nesting_level_{0,1,2}/`` with a
``config.json`` and ``diffusion_pytorch_model.safetensors`` (or ``.bin``). Its layers
compute what ml-mdm's do, with these differences of form, undone here:

* attention projections are ``nn.Linear`` (``attn1.to_qkv``, ``proj_out``, the
  feed-forward's ``linear_gelu.proj`` / ``linear_out``) where ml-mdm and we have 1x1
  convolutions: the weights gain two unit dimensions;
* a stage's attention layers after one ResNet are ``attentions.j.transformer_blocks.k``,
  ours ``attn.(j*L + k)``; the mid block is ``resnets.0, attentions.0, resnets.1``;
* the innermost UNet's time sinusoid is ``[cos, sin]`` when ``flip_sin_to_cos`` (its
  default), ours ``[sin, cos]``: the two halves of ``time_embedding.linear_1``'s input
  columns are swapped, which leaves its output unchanged.

The port hard-codes what ml-mdm hard-codes (32-group norms in attention, the pooled text
embedding of the innermost UNet); every option of ``config.json`` that would make it
compute something our NestedUNet cannot is refused with :class:`DiffusersMdmError`.
Weight files are read without running code: safetensors, or torch's ``weights_only``
unpickler for ``.bin``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config.run import DiffusionConfig, RunConfig, SampleConfig, TextConfig
from ..data.config import DataConfig
from ..models.config import LevelConfig, ModelConfig
from .mlmdm.defaults import DEMO_GUIDANCE, DEMO_STEPS, TEXT_ENCODER_DIMS
from .mlmdm.errors import CheckpointFormatError, MlmdmError, MlmdmMismatchError, UnsafeCheckpointError
from .mlmdm.weights import expected_shapes
from .mlmdm.writer import prepare_out, write_checkpoint

__all__ = [
    "DiffusersMdmError",
    "PortConversion",
    "convert_diffusers_mdm",
    "convert_port_state_dict",
    "diffusers_key",
    "model_from_diffusers",
    "read_port_weights",
]

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


@dataclass
class PortConversion:
    """What :func:`convert_diffusers_mdm` wrote."""

    out: Path
    config: RunConfig
    num_parameters: int
    files: list[str]
    notes: list[str]


def _run_config(model: ModelConfig, resolution: int, name: str, notes: list[str]) -> RunConfig:
    """ml-mdm's diffusion and demo sampling, which the port reproduces (its MatryoshkaDDIMScheduler)."""
    encoder = next((name for name, dim in TEXT_ENCODER_DIMS.items() if dim == model.text_dim and "flan" in name), None)
    if encoder is None:
        encoder = "google/flan-t5-xl"
        notes.append(f"no FLAN-T5 encoder gives {model.text_dim}-wide tokens: set text.encoder in config.yaml")
    try:
        return RunConfig(
            run_dir=f"runs/{name}",
            model=model,
            # The port's pipeline sets schedule_shifted_power 2 for three levels, else 1, as ml-mdm's configs;
            # it calls the UNet at t - 1 on ml-mdm's step grid ("matryoshka_style"), as our "mlmdm" spacing.
            diffusion=DiffusionConfig(
                schedule="squaredcos",
                num_steps=1000,
                prediction="v",
                loss_target="eps",
                shift_power=2.0 if model.num_levels == 3 else 1.0,
            ),
            data=DataConfig(source="mlmdm-tsv", path="training_0.tsv", resolution=resolution, captions=True),
            sample=SampleConfig(
                sampler="ddim",
                steps=DEMO_STEPS.get(resolution, 100),
                spacing="mlmdm",
                num=4,
                guidance=DEMO_GUIDANCE,
                negative_prompt="",
                eta=0.0,
                threshold="clip",
            ),
            text=TextConfig(encoder=encoder, max_length=128, mlmdm_compat="sample"),
        )
    except ValueError as error:
        raise DiffusersMdmError(f"the port's model gives no valid run config: {error}") from error


def convert_diffusers_mdm(
    model_path: str | os.PathLike, out: str | os.PathLike, *, resolution: int | None = None
) -> PortConversion:
    """Convert one nesting level of the port (its directory, or its weight file) into our checkpoint at ``out``.

    ``resolution`` is the top level's side (default: 64 at the innermost level, nested by the
    model's ratio). Everything is written to a temporary directory renamed at the end: a
    failure leaves nothing behind.
    """
    path, out = Path(model_path).expanduser(), Path(out).expanduser()
    weights, config_file = _weight_file(path)
    prepare_out(out)
    try:
        options = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DiffusersMdmError(f"{config_file} is not valid JSON: {error}") from error
    if not isinstance(options, Mapping):
        raise DiffusersMdmError(f"{config_file} must hold a JSON object")
    notes: list[str] = []
    model, flips = model_from_diffusers(options, notes)
    # The port's models are ml-mdm's: a 64-pixel innermost UNet, nested by the outer UNets' ratio.
    top = resolution or 64 * model.nest_ratio ** (model.num_levels - 1)
    config = _run_config(model, top, f"{config_file.parent.name}-converted", notes)
    tensors = convert_port_state_dict(read_port_weights(weights), model, flips, str(weights))
    source = {
        "format": "diffusers-mdm",
        "checkpoint": str(weights),
        "config": str(config_file),
        "diffusers_config": options,
        "notes": list(notes),
    }
    state = {"step": 0, "num_levels": model.num_levels, "source": source}
    files = write_checkpoint(out, tensors, config, 0, state, source="diffusers-mdm")
    return PortConversion(out, config, sum(t.numel() for t in tensors.values()), files, notes)
