"""Post-processing of predicted clean images x0 during sampling."""

from __future__ import annotations

import torch
from torch import Tensor


def dynamic_threshold(x0: Tensor, percentile: float = 0.995) -> Tensor:
    """Imagen dynamic thresholding (Saharia et al. 2022, §2.3).

    Per sample, s = max(quantile(|x0|, percentile), 1); x0 is clipped to [-s, s] and
    divided by s, so saturated pixels are pulled inwards instead of flattened.
    """
    if not 0 < percentile <= 1:
        raise ValueError(f"percentile must be in (0, 1], got {percentile}")
    flat = x0.flatten(1).abs().float()
    s = _quantile_rows(flat, percentile).clamp(min=1.0)
    s = s.to(x0.dtype).view((-1,) + (1,) * (x0.ndim - 1))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def threshold_x0(x0: Tensor, clip: bool = True, dynamic: float | None = None) -> Tensor:
    """Apply dynamic thresholding (if ``dynamic`` is a percentile) and then clipping to [-1, 1]."""
    if dynamic is not None:
        x0 = dynamic_threshold(x0, dynamic)
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    return x0


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
