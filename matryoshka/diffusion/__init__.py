"""Noise schedules, the multi-resolution forward process and joint samplers."""

from .parameterisation import (
    PREDICTION_TYPES,
    convert_prediction,
    eps_from_v,
    eps_from_x0,
    prediction_target,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_v,
)
from .process import MatryoshkaDiffusion, PyramidModel
from .samplers import (
    SAMPLERS,
    Conditioning,
    cat_conditioning,
    get_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sampling_timesteps,
    unconditional_of,
)
from .schedules import (
    SCHEDULE_KINDS,
    NoiseSchedule,
    linear,
    logsnr_cosine,
    make_schedule,
    squaredcos,
)
from .thresholding import THRESHOLD_MODES, dynamic_threshold, threshold_options, threshold_x0

__all__ = [
    "PREDICTION_TYPES",
    "SAMPLERS",
    "SCHEDULE_KINDS",
    "THRESHOLD_MODES",
    "Conditioning",
    "MatryoshkaDiffusion",
    "NoiseSchedule",
    "PyramidModel",
    "cat_conditioning",
    "convert_prediction",
    "dynamic_threshold",
    "eps_from_v",
    "eps_from_x0",
    "get_sampler",
    "linear",
    "logsnr_cosine",
    "make_schedule",
    "prediction_target",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sampling_timesteps",
    "squaredcos",
    "threshold_options",
    "threshold_x0",
    "unconditional_of",
    "v_from_x0_eps",
    "x0_from_eps",
    "x0_from_v",
]
