"""Post-processing of predicted clean images x0 during sampling."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

THRESHOLD_MODES = ("none", "clip", "dynamic", "dynamic_if")
"""none; clip to [-1, 1]; dynamic thresholding as Imagen; dynamic thresholding as DeepFloyd IF."""

# (percentile, cap on s) of each dynamic mode: Imagen (Saharia et al. 2022, §2.3) takes the
# 99.5th percentile of |x0| and leaves s uncapped; DeepFloyd IF (diffusers' DDPMScheduler with
# thresholding=True as IF configures it) the 95th, with s at most 1.5.
DYNAMIC_DEFAULTS = {"dynamic": (0.995, None), "dynamic_if": (0.95, 1.5)}


def dynamic_threshold(x0: Tensor, percentile: float = 0.995, max_value: float | None = None) -> Tensor:
    """Imagen dynamic thresholding (Saharia et al. 2022, §2.3).

    Per sample, s = clamp(quantile(|x0|, percentile), 1, max_value); x0 is clipped to
    [-s, s] and divided by s, so saturated pixels are pulled inwards instead of flattened.
    """
    if not 0 < percentile <= 1:
        raise ValueError(f"percentile must be in (0, 1], got {percentile}")
    flat = x0.flatten(1).abs().float()
    s = _quantile_rows(flat, percentile).clamp(min=1.0, max=max_value)
    s = s.to(x0.dtype).view((-1,) + (1,) * (x0.ndim - 1))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def threshold_x0(
    x0: Tensor, clip: bool = True, dynamic: float | None = None, dynamic_max: float | None = None
) -> Tensor:
    """Apply dynamic thresholding (if ``dynamic`` is a percentile, s capped at ``dynamic_max``) and then
    clipping to [-1, 1] (a no-op after dynamic thresholding, whose s >= 1)."""
    if dynamic is not None:
        x0 = dynamic_threshold(x0, dynamic, dynamic_max)
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    return x0


def threshold_options(mode: str, percentile: float | None = None, max_value: float | None = None) -> dict[str, Any]:
    """The samplers' ``clip_x0`` / ``dynamic_threshold`` / ``dynamic_max`` for a mode of THRESHOLD_MODES.

    ``percentile`` and ``max_value`` override a dynamic mode's defaults (DYNAMIC_DEFAULTS).
    """
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"unknown threshold mode {mode!r}; valid: {', '.join(THRESHOLD_MODES)}")
    if mode not in DYNAMIC_DEFAULTS:
        if percentile is not None or max_value is not None:
            raise ValueError(f"a threshold percentile or maximum applies to dynamic thresholding, not {mode!r}")
        return {"clip_x0": mode == "clip", "dynamic_threshold": None, "dynamic_max": None}
    default_percentile, default_max = DYNAMIC_DEFAULTS[mode]
    percentile = default_percentile if percentile is None else percentile
    max_value = default_max if max_value is None else max_value
    if not 0 < percentile <= 1:
        raise ValueError(f"the threshold percentile must be in (0, 1], got {percentile}")
    if max_value is not None and max_value < 1:
        raise ValueError(f"the threshold maximum must be >= 1 (s never goes below 1), got {max_value}")
    return {"clip_x0": True, "dynamic_threshold": percentile, "dynamic_max": max_value}


def _quantile_rows(x: Tensor, q: float) -> Tensor:
    """Row-wise quantile with linear interpolation (as ``torch.quantile``).

    ``torch.quantile`` refuses inputs above 2**24 elements, which a batch of 1024^2
    RGB images exceeds, so two order statistics are taken with ``kthvalue``.
    """
    n = x.shape[1]
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    v_lo = x.kthvalue(lo + 1, dim=1).values
    v_hi = x.kthvalue(hi + 1, dim=1).values
    return v_lo + (pos - lo) * (v_hi - v_lo)
