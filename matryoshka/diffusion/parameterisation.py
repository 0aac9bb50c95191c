"""The network's output parameterisations (eps, x0, v) and the loss weights between them."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Prediction = Literal["eps", "x0", "v"]
PREDICTION_TYPES: tuple[str, ...] = ("eps", "x0", "v")
LossWeighting = Literal["none", "min_snr"]


# ----- parameterisations ------------------------------------------------------
# With z = alpha*x0 + sigma*eps and alpha^2 + sigma^2 = 1 (VP), v = alpha*eps - sigma*x0
# (Salimans & Ho 2022). Each conversion below is written in the form that avoids
# dividing by a coefficient that can be near zero where that is possible.


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return alpha * eps - sigma * x0


def x0_from_v(z: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return alpha * z - sigma * v


def eps_from_v(z: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return sigma * z + alpha * v


def x0_from_eps(z: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (z - sigma * eps) / alpha


def eps_from_x0(z: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (z - alpha * x0) / sigma


def convert_prediction(pred: Tensor, source: str, target: str, z: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Convert a prediction of type ``source`` into type ``target`` at noisy input z."""
    check_prediction(source)
    check_prediction(target)
    if source == target:
        return pred
    if source == "v":
        return x0_from_v(z, pred, alpha, sigma) if target == "x0" else eps_from_v(z, pred, alpha, sigma)
    if source == "eps":
        if target == "x0":
            return x0_from_eps(z, pred, alpha, sigma)
        return (pred - sigma * z) / alpha  # v, using x0 = (z - sigma*eps)/alpha
    if target == "eps":
        return eps_from_x0(z, pred, alpha, sigma)
    return (alpha * z - pred) / sigma  # v from x0, using eps = (z - alpha*x0)/sigma


def prediction_target(kind: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The regression target of type ``kind`` for clean data x0 and noise eps."""
    check_prediction(kind)
    if kind == "x0":
        return x0
    if kind == "eps":
        return eps
    return v_from_x0_eps(x0, eps, alpha, sigma)


def loss_weight(kind: str, log_snr: Tensor, weighting: LossWeighting, gamma: float, floor: float = 0.0) -> Tensor:
    """Per-sample factor on a loss taken in parameterisation ``kind``.

    An MSE on eps is SNR times the MSE on x0, one on v is (SNR + 1) times it. Min-SNR-gamma
    (Hang et al. 2023, Eq. 9) weights the x0 error by min(SNR, gamma), so the factor on a
    ``kind`` loss is min(SNR, gamma) / that multiplier: nearly clean samples stop dominating
    the gradient. ``floor`` > 0 weights the x0 error by clamp(SNR, floor, gamma) instead, so
    the noisiest samples, whose min-SNR weight SNR goes to 0, stay trained: floor 1 is Salimans
    & Ho's (2022, §4) truncated-SNR weighting at that end (worse on emoji64: docs/benchmarks.md).
    """
    if weighting == "none":
        return torch.ones_like(log_snr)
    if weighting != "min_snr":
        raise ValueError(f"unknown loss weighting {weighting!r}; valid: none, min_snr")
    snr = log_snr.exp()
    clipped = snr.clamp(min=floor, max=gamma)
    if kind == "x0":
        return clipped
    if kind == "eps":
        return clipped / snr
    return clipped / (snr + 1)


def check_prediction(kind: str) -> None:
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {kind!r}; valid types: {', '.join(PREDICTION_TYPES)}")
