"""ml-mdm's ``diffusion_config`` (noise schedule, prediction, per-level losses) -> our DiffusionConfig.

Options that change what the sampler computes are reproduced exactly or refused with
:class:`MlmdmConfigError`; options that only change training are collected in ``training``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...config.run import DiffusionConfig
from .defaults import (
    DIFFUSION_DEFAULTS,
    NESTED_DIFFUSION_DEFAULTS,
    PREDICTIONS,
    SAMPLER_DEFAULTS,
    SCHEDULES,
    THRESHOLDS,
)
from .errors import MlmdmConfigError
from .values import parse_bool, parse_enum, parse_float, parse_int, parse_ratios, section_of, with_defaults

__all__ = ["DiffusionSettings", "diffusion_from_mlmdm"]

_SAMPLER = "diffusion_config.sampler_config"


@dataclass
class DiffusionSettings:
    """Our diffusion options for an ml-mdm config, and its thresholding of x0 when sampling."""

    schedule: str
    num_steps: int
    shift_power: float
    prediction: str
    loss_target: str
    threshold: str
    """ml-mdm's threshold_function member name (a key of THRESHOLDS)."""
    level_loss_weights: list[float] = field(default_factory=list)
    """Innermost level first, like ``model.levels``."""
    loss_on_all_levels: bool = True
    mixed_ratio: float | None = None

    def config(self) -> DiffusionConfig:
        """Built on demand, so that its own checks report in the order the caller chooses."""
        return DiffusionConfig(
            schedule=self.schedule,
            num_steps=self.num_steps,
            shift_power=self.shift_power,
            prediction=self.prediction,
            loss_target=self.loss_target,
            level_loss_weights=self.level_loss_weights,
            loss_on_all_levels=self.loss_on_all_levels,
            mixed_ratio=self.mixed_ratio,
        )


def _diffusion_section(raw: Mapping[str, Any], nested: bool, notes: list[str]) -> dict[str, Any]:
    """``diffusion_config`` with the nested options ml-mdm also reads from the top level."""
    diffusion_raw = section_of(raw, "diffusion_config")
    if not isinstance(diffusion_raw, Mapping):
        raise MlmdmConfigError("diffusion_config must be a mapping")
    diffusion_raw = dict(diffusion_raw)
    for key in ("mixed_ratio", "multi_res_weights", "use_double_loss"):
        # Saved `args` hold every diffusion_config field, so its default there means "not set".
        if key in raw and raw[key] != NESTED_DIFFUSION_DEFAULTS[key]:
            current = diffusion_raw.get(key, NESTED_DIFFUSION_DEFAULTS[key])
            if current != NESTED_DIFFUSION_DEFAULTS[key] and current != raw[key]:
                raise MlmdmConfigError(
                    f"{key} is given both at the top level and in diffusion_config with different values"
                )
            diffusion_raw[key] = raw[key]
            notes.append(
                f"top-level {key}={raw[key]!r} applied to diffusion_config (ml-mdm's own parser, simple-parsing, "
                "ignores top-level keys of a nested section, so ml-mdm itself trained without it)"
            )
    if not nested:
        # Sorted so that the notes come in the same order on every run.
        for key in sorted(set(diffusion_raw) - set(DIFFUSION_DEFAULTS)):
            if key in NESTED_DIFFUSION_DEFAULTS:
                notes.append(f"diffusion_config.{key} only applies to nested models: ignored")
                diffusion_raw.pop(key)
    return with_defaults(diffusion_raw, NESTED_DIFFUSION_DEFAULTS if nested else DIFFUSION_DEFAULTS, "diffusion_config")


def _schedule(sampler: Mapping[str, Any]) -> tuple[int, str]:
    """(number of training steps, ml-mdm schedule_type)."""
    steps = parse_int(sampler["num_diffusion_steps"], f"{_SAMPLER}.num_diffusion_steps")
    if steps is None or steps < 2:
        raise MlmdmConfigError(f"{_SAMPLER}.num_diffusion_steps must be at least 2, got {steps}")
    schedule_type = parse_enum(sampler["schedule_type"], SCHEDULES, f"{_SAMPLER}.schedule_type")
    if schedule_type == "DDPM":
        beta_start = parse_float(sampler["beta_start"], f"{_SAMPLER}.beta_start")
        beta_end = parse_float(sampler["beta_end"], f"{_SAMPLER}.beta_end")
        if not (math.isclose(beta_start, 1e-4) and math.isclose(beta_end, 0.02)):
            raise MlmdmConfigError(
                f"{_SAMPLER}: DDPM betas other than 0.0001..0.02 are not supported (got {beta_start}..{beta_end})"
            )
    return steps, schedule_type


def _predictions(sampler: Mapping[str, Any], training: list[str]) -> tuple[str, str]:
    """(what the network predicts, what training regresses) in our names."""
    prediction = PREDICTIONS[parse_enum(sampler["prediction_type"], PREDICTIONS, f"{_SAMPLER}.prediction_type")]
    loss_target = prediction
    if sampler["loss_target_type"] is not None:
        try:
            loss_target = PREDICTIONS[
                parse_enum(sampler["loss_target_type"], PREDICTIONS, f"{_SAMPLER}.loss_target_type")
            ]
        except MlmdmConfigError as error:
            training.append(f"{error} (ml-mdm cannot train with it either)")
    return prediction, loss_target


def _shift_power(sampler: Mapping[str, Any], nested: bool, notes: list[str]) -> float:
    """The power of the resolution-shifted schedule; refuses ml-mdm's other signal scalings."""
    rescale_schedule = parse_float(sampler["rescale_schedule"], f"{_SAMPLER}.rescale_schedule")
    if rescale_schedule is not None and rescale_schedule > 1:
        raise MlmdmConfigError(
            f"{_SAMPLER}.rescale_schedule={rescale_schedule} (a shifted base schedule) is not supported"
        )
    rescale_signal = parse_float(sampler["rescale_signal"], f"{_SAMPLER}.rescale_signal")
    shifted = parse_bool(sampler["schedule_shifted"], f"{_SAMPLER}.schedule_shifted")
    shift_power = parse_float(sampler["schedule_shifted_power"], f"{_SAMPLER}.schedule_shifted_power")
    if shift_power is None:
        shift_power = 1.0
    if nested and not shifted:
        raise MlmdmConfigError(
            f"{_SAMPLER}.schedule_shifted=false: ml-mdm then divides each level's signal by its scale instead of "
            "shifting the noise schedule; this is not supported"
        )
    if rescale_signal and rescale_signal != 1:
        if nested:
            notes.append(
                f"{_SAMPLER}.rescale_signal={rescale_signal} is unused by ml-mdm for shifted nested models: ignored"
            )
        else:
            raise MlmdmConfigError(f"{_SAMPLER}.rescale_signal={rescale_signal} (signal scaling) is not supported")
    if parse_bool(sampler["reproject_signal"], f"{_SAMPLER}.reproject_signal"):
        notes.append(f"{_SAMPLER}.reproject_signal is unused by ml-mdm: ignored")
    return shift_power


def _check_outputs(diffusion: Mapping[str, Any], training: list[str]) -> None:
    output_scale = parse_float(diffusion["model_output_scale"], "diffusion_config.model_output_scale")
    if output_scale:
        raise MlmdmConfigError(
            f"diffusion_config.model_output_scale={output_scale} (tanh-squashed outputs) is not supported"
        )
    if parse_bool(diffusion["use_vdm_loss_weights"], "diffusion_config.use_vdm_loss_weights"):
        training.append("diffusion_config.use_vdm_loss_weights=true (VDM loss weighting; ml-mdm's default)")


def _mixed_ratio(value: Any, count: int, training: list[str]) -> float | None:
    """ml-mdm's ``mixed_ratio`` parts -> the fraction of batches that train the top level too."""
    parts = parse_ratios(value, "diffusion_config.mixed_ratio")
    if parts is None:
        return None
    if len(parts) < count or any(p < 0 for p in parts) or sum(parts) <= 0:
        training.append(f"mixed_ratio {value!r} needs one non-negative part per level ({count})")
        return None
    cumulative = [sum(parts[: i + 1]) / sum(parts) for i in range(len(parts))][:count]
    if any(abs(c - 1.0) > 1e-9 for c in cumulative[1:]):
        training.append(
            f"mixed_ratio {value!r} subsamples levels below the top one; only the top level can be subsampled here"
        )
        return None
    return cumulative[0] if cumulative[0] < 1.0 - 1e-9 else None


def _level_losses(
    diffusion: Mapping[str, Any], settings: DiffusionSettings, count: int, notes: list[str], training: list[str]
) -> None:
    """A nested model's per-level loss options, set on ``settings``."""
    if not parse_bool(diffusion["no_use_residual"], "diffusion_config.no_use_residual"):
        raise MlmdmConfigError(
            "diffusion_config.no_use_residual=false (ml-mdm's default): the residual mode adds an upsampled "
            "low-resolution prediction to the high one; it is a dead path in ml-mdm (it cannot run) and is not "
            "supported. Released configs set no_use_residual: true"
        )
    for key in ("use_random_interp", "random_downsample", "average_downsample", "mid_downsample"):
        if parse_bool(diffusion[key], f"diffusion_config.{key}"):
            notes.append(f"diffusion_config.{key} is unused by ml-mdm: ignored")
    settings.loss_on_all_levels = parse_bool(diffusion["use_double_loss"], "diffusion_config.use_double_loss")
    weights = parse_ratios(diffusion["multi_res_weights"], "diffusion_config.multi_res_weights")
    if weights is not None:
        if not settings.loss_on_all_levels:
            training.append("multi_res_weights without use_double_loss (ml-mdm asserts against it)")
        if len(weights) != count:
            training.append(f"multi_res_weights {weights} needs one weight per level ({count})")
        elif any(w < 0 for w in weights):
            raise MlmdmConfigError(f"multi_res_weights must be non-negative, got {weights}")
        else:
            settings.level_loss_weights = weights[::-1]  # ml-mdm lists the highest resolution first
    settings.mixed_ratio = _mixed_ratio(diffusion["mixed_ratio"], count, training)


def diffusion_from_mlmdm(
    raw: Mapping[str, Any], count: int, notes: list[str], training: list[str]
) -> DiffusionSettings:
    """Our diffusion settings for a model of ``count`` levels; appends to ``notes`` and ``training``."""
    nested = count > 1
    diffusion = _diffusion_section(raw, nested, notes)
    sampler = with_defaults(diffusion["sampler_config"], SAMPLER_DEFAULTS, _SAMPLER)
    steps, schedule_type = _schedule(sampler)
    prediction, loss_target = _predictions(sampler, training)
    shift_power = _shift_power(sampler, nested, notes)
    threshold = parse_enum(sampler["threshold_function"], THRESHOLDS, f"{_SAMPLER}.threshold_function")
    _check_outputs(diffusion, training)
    settings = DiffusionSettings(
        schedule=SCHEDULES[schedule_type],
        num_steps=steps,
        shift_power=shift_power,
        prediction=prediction,
        loss_target=loss_target,
        threshold=threshold,
    )
    if nested:
        _level_losses(diffusion, settings, count, notes, training)
    return settings
