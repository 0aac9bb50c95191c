"""The posterior mean of x0 over a reference set: a low-variance training target.

The denoising loss regresses the network on x0 (or eps) of the one image that was noised, yet
its minimiser is E[x0 | z_t]. Over a finite reference set {x_n} that expectation is exact:
p(x_n | z) ~ exp(-sum_r |z^r - alpha_r x_n^r|^2 / (2 sigma_r^2)) over the pyramid's levels r,
and E[x0^r | z] = sum_n p(x_n | z) x_n^r. Regressing on it instead of on x0 keeps the loss's
expected gradient (the same minimiser, when the set is the training set) and removes the target's
variance where it is largest, at the noise levels where several images could have made z
(Xu et al. 2023, "Stable target field for reduced variance score estimation").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def posterior_log_weights(
    z: Sequence[Tensor], alphas: Sequence[Tensor], sigmas: Sequence[Tensor], reference: Sequence[Tensor]
) -> Tensor:
    """log p(x_n | z) up to a per-sample constant, (B, N), summed over the pyramid's levels.

    ``z``: the noisy levels (B, ...); ``alphas``/``sigmas``: (B, 1, ...) per level;
    ``reference``: the set's levels (N, ...), in the same order.
    """
    total = None
    for zi, alpha, sigma, ref in zip(z, alphas, sigmas, reference):
        flat_z = zi.float().flatten(1)
        flat_ref = ref.float().flatten(1)
        scale = (alpha.float() / sigma.float().square()).flatten()[:, None]
        # -|z - a x|^2 / (2 s^2) = (a/s^2) z.x - (a^2 / (2 s^2)) |x|^2 - |z|^2 / (2 s^2); the last is constant in n.
        logits = scale * (flat_z @ flat_ref.T) - 0.5 * scale * alpha.float().flatten()[:, None] * flat_ref.square().sum(1)
        total = logits if total is None else total + logits
    return total


def posterior_mean(
    z: Sequence[Tensor], alphas: Sequence[Tensor], sigmas: Sequence[Tensor], reference: Sequence[Tensor]
) -> list[Tensor]:
    """E[x0^r | z] at every level r over the reference set (float32, shaped like ``z``)."""
    weights = torch.softmax(posterior_log_weights(z, alphas, sigmas, reference), dim=1)
    return [(weights @ ref.float().flatten(1)).view(zi.shape) for zi, ref in zip(z, reference)]
