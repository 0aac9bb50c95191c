"""An ml-mdm config (a YAML mapping, or the ``args`` saved in a checkpoint) -> our :class:`RunConfig`.

The model and the diffusion process are mapped by :mod:`.unet_config` and
:mod:`.diffusion_mapping`; this module adds data, training, sampling and text settings
and decides what to do with options only training would notice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...config import ConfigError
from ...config.run import RunConfig, SampleConfig, TextConfig, TrainConfig
from ...data.config import DataConfig
from ...models.config import ModelConfig
from .defaults import (
    DEFAULT_TEXT_MODEL,
    DEMO_GUIDANCE,
    DEMO_STEPS,
    READER_TEXT_DEFAULTS,
    TEXT_ENCODER_DIMS,
    THRESHOLDS,
)
from .diffusion_mapping import diffusion_from_mlmdm
from .errors import MlmdmConfigError
from .unet_config import model_from_mlmdm
from .values import parse_bool, parse_float, parse_int, section_of

__all__ = ["MlmdmConversion", "run_config_from_mlmdm"]

# Captions are cut here when the config sets no reader_config.max_token_length.
_DEFAULT_MAX_TOKENS = 128


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


def _checked_raw(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The config with ml-mdm's command-line spelling (``a-b``) folded into its field names (``a_b``)."""
    if not isinstance(raw, Mapping):
        raise MlmdmConfigError(f"an ml-mdm config must be a mapping, got {type(raw).__name__}")
    raw = {str(key).replace("-", "_"): value for key, value in raw.items()}
    if "unet_config" not in raw:
        raise MlmdmConfigError(
            "the ml-mdm config has no 'unet_config' section (is it a model config such as cc12m_256x256.yaml?)"
        )
    if raw.get("categorical_conditioning") and parse_bool(raw["categorical_conditioning"], "categorical_conditioning"):
        raise MlmdmConfigError("categorical_conditioning (class labels as one-hot text) is not supported")
    return raw


def _top_resolution(raw: Mapping[str, Any], reader: Mapping[str, Any], resolution: int | None, notes: list[str]) -> int:
    """The model's top resolution: ``resolution`` if given, else the config's image size."""
    sample_size = parse_int(raw.get("sample_image_size"), "sample_image_size")
    reader_size = parse_int(reader.get("image_size"), "reader_config.image_size")
    top = (
        resolution
        or (sample_size if sample_size and sample_size > 0 else None)
        or (reader_size if reader_size and reader_size > 0 else None)
    )
    if top is None:
        raise MlmdmConfigError(
            "the config gives no image size (sample_image_size or reader_config.image_size): pass the resolution"
        )
    both = sample_size and reader_size and sample_size > 0 and reader_size > 0
    if both and sample_size != reader_size and not resolution:
        notes.append(
            f"sample_image_size={sample_size} differs from reader_config.image_size={reader_size}: using {sample_size}"
        )
    return top


def _data(reader: Mapping[str, Any], top: int) -> DataConfig:
    """ml-mdm's TSV reader (its file layout; see docs/mlmdm.md) at the model's top resolution."""
    return DataConfig(
        source="mlmdm-tsv",
        path="training_0.tsv",
        resolution=top,
        captions=True,
        crop="random" if reader.get("random_crop") is True else "center",
    )


def _train(raw: Mapping[str, Any], training: list[str]) -> TrainConfig:
    """ml-mdm's optimisation options; unset ones keep our defaults."""
    defaults = TrainConfig()
    train = TrainConfig(
        lr=parse_float(raw.get("lr"), "lr") or defaults.lr,
        warmup_steps=parse_int(raw.get("warmup_steps"), "warmup_steps") or defaults.warmup_steps,
        grad_clip=parse_float(raw.get("gradient_clip_norm"), "gradient_clip_norm") or defaults.grad_clip,
        batch_size=parse_int(raw.get("batch_size"), "batch_size") or defaults.batch_size,
        grad_accum=parse_int(raw.get("num_gradient_accumulations"), "num_gradient_accumulations") or 1,
        ema_decay=0.9999,  # ml-mdm's ModelEma default
    )
    loss_factor = parse_float(raw.get("loss_factor"), "loss_factor")
    if loss_factor is not None and loss_factor != 1:
        training.append(f"loss_factor={loss_factor}")
    return train


def _sample(steps: int, threshold: str) -> SampleConfig:
    """ml-mdm's demo sampling: DDIM (eta 0) on its step grid, guidance 7.5 against the encoded empty prompt."""
    mode, percentile, cap = THRESHOLDS[threshold]
    return SampleConfig(
        sampler="ddim",
        steps=steps,
        spacing="mlmdm",
        num=4,
        guidance=DEMO_GUIDANCE,
        negative_prompt="",
        eta=0.0,
        threshold=mode,
        threshold_percentile=percentile,
        threshold_max=cap,
    )


def _sampling(sample: SampleConfig, threshold: str) -> dict[str, Any]:
    """The same settings as a record of plain values (state.pt), with the samplers' keyword arguments."""
    return {
        "sampler": sample.sampler,
        "eta": sample.eta,
        "steps": sample.steps,
        "guidance": sample.guidance,
        "negative_prompt": sample.negative_prompt,
        "threshold_function": threshold,
        **{key: value for key, value in sample.sampler_options().items() if key not in ("spacing", "eta")},
    }


def _text_model(raw: Mapping[str, Any], width: int, saved_model: str | None, notes: list[str]) -> str:
    """The config's text encoder, or the checkpoint's own when only the latter has the model's width."""
    text_model = str(raw.get("text_model") or DEFAULT_TEXT_MODEL)
    if TEXT_ENCODER_DIMS.get(text_model, width) == width:
        return text_model
    if saved_model is not None and TEXT_ENCODER_DIMS.get(saved_model) == width:
        notes.append(f"text.encoder is {saved_model!r}, the text_model saved in the checkpoint (width {width})")
        return saved_model
    notes.append(
        f"text.encoder {text_model!r} does not give the model's {width}-wide tokens: set text.encoder in "
        "config.yaml to the encoder the model was trained with"
    )
    return text_model


def _text(raw: Mapping[str, Any], reader: Mapping[str, Any], text_model: str, notes: list[str]) -> TextConfig:
    max_tokens = parse_int(reader.get("max_token_length"), "reader_config.max_token_length")
    if not max_tokens or max_tokens <= 0:
        max_tokens = _DEFAULT_MAX_TOKENS
        notes.append(f"reader_config.max_token_length is unset: captions are cut at {_DEFAULT_MAX_TOKENS} tokens")
    # ml-mdm's own tokenisation of T5's vocabulary as its sampling scripts do it (see docs/text.md).
    return TextConfig(encoder=text_model, max_length=max_tokens, mlmdm_compat="sample")


def _text_encoder(text: TextConfig, model: ModelConfig, reader: Mapping[str, Any]) -> dict[str, Any]:
    """What a caller needs to encode prompts as ml-mdm did for this model."""
    return {
        "model": text.encoder,
        "dim": model.text_dim,
        "zero_padding_embeddings": True,
        "attention_mask_in_cross_attention": model.text_attention_mask,
        **{key: reader.get(key, default) for key, default in READER_TEXT_DEFAULTS.items()},
    }


def _settle_training(training: list[str], strict: bool, notes: list[str]) -> None:
    """Refuse training differences unless told to tolerate them, then list them in the notes."""
    if not training:
        return
    if strict:
        raise MlmdmConfigError(
            "training options our trainer cannot reproduce: "
            + "; ".join(training)
            + ". Sampling is unaffected: pass --ignore-training-options (strict_training=False) to convert anyway"
        )
    notes.extend(f"training differs from ml-mdm: {item}" for item in training)


def run_config_from_mlmdm(
    raw: Mapping[str, Any],
    *,
    text_dim: int | None = None,
    resolution: int | None = None,
    strict_training: bool = True,
    name: str | None = None,
    checkpoint_text_dim: int | None = None,
    checkpoint_text_model: str | None = None,
) -> MlmdmConversion:
    """Map an ml-mdm config (YAML mapping or a checkpoint's saved ``args``) to a RunConfig.

    Options that change the network's output or the sampler are reproduced exactly or
    refused with :class:`MlmdmConfigError`. Options that only change training (loss
    weighting, freezing) and that our trainer cannot reproduce are refused too unless
    ``strict_training=False``, in which case they are listed in the notes.

    ``checkpoint_text_dim`` (the token width the checkpoint's tensors take) wins over the
    width of the config's ``text_model``; ``checkpoint_text_model`` (the one saved in the
    checkpoint's arguments) then names the encoder if its width fits.
    """
    raw = _checked_raw(raw)
    notes: list[str] = []
    training: list[str] = []
    model = model_from_mlmdm(raw, text_dim, notes, training, checkpoint_text_dim)
    diffusion = diffusion_from_mlmdm(raw, model.num_levels, notes, training)
    reader = section_of(raw, "reader_config")
    if not isinstance(reader, Mapping):
        raise MlmdmConfigError("reader_config must be a mapping")
    top = _top_resolution(raw, reader, resolution, notes)
    data = _data(reader, top)
    train = _train(raw, training)
    sample = _sample(DEMO_STEPS.get(top, 100), diffusion.threshold)
    text = _text(raw, reader, _text_model(raw, model.text_dim, checkpoint_text_model, notes), notes)
    try:
        config = RunConfig(
            run_dir=f"runs/{name or f'mlmdm-{top}'}",
            model=model,
            diffusion=diffusion.config(),
            data=data,
            train=train,
            sample=sample,
            text=text,
        )
    except (ValueError, ConfigError) as error:
        raise MlmdmConfigError(f"the ml-mdm config does not give a valid run config: {error}") from error
    text_encoder = _text_encoder(text, model, reader)
    _settle_training(training, strict_training, notes)
    return MlmdmConversion(config, _sampling(sample, diffusion.threshold), text_encoder, notes)
