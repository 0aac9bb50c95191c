"""Samplers that denoise all pyramid levels jointly (paper §3.1).

Every sampler has the same signature::

    sampler(model, noise, process, steps, cond=None, uncond=None, guidance=1.0,
            generator=None, callback=None, *, guidance_interval=None, clip_x0=True,
            dynamic_threshold=None, dynamic_max=None, spacing="mlmdm", **sampler_specific) -> list[Tensor]

``noise`` is the initial pyramid (one N(0, I) tensor per level, highest resolution
first; see ``MatryoshkaDiffusion.initial_noise``) and the result is the final pyramid
in the same order; ``result[0]`` is the image. Each step makes exactly one network
call (with a doubled batch when guidance is active) and moves every level from t to
the next t with that level's own shifted schedule. Put the model in eval mode first.

Step spacing (``spacing``): "mlmdm" follows ml-mdm, ``round(arange(n+1) * (T+1)/(n+1))``
reversed, so the first step starts below T (981 for n = 50, 962 for n = 25, 834 for
n = 5), where the model never sees pure noise at the lowest level's SNR; "trailing"
(Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", Table 2)
is ``round(linspace(T, 0, n+1))``, which starts every sampler at t = T. Either way the last
step lands on t = 0, where gamma = 1 and the sample equals the (thresholded) x0 estimate.
Results are deterministic for a given initial noise and ``generator`` (which must live
on the noise's device).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from .process import MatryoshkaDiffusion, PyramidModel
from .thresholding import threshold_x0

Callback = Callable[[int, int, int, list[Tensor], list[Tensor]], None]
"""callback(step_index, num_steps, t, x0_pred_list, z_list), called after each step."""


class Conditioning(Protocol):
    """What classifier-free guidance needs from a conditioning object.

    ``cat(other)`` concatenates along the batch (self first); ``unconditional()``
    returns the "null" conditioning of the same batch size (used when no ``uncond``
    is given). Plain tensors are also accepted and concatenated with ``torch.cat``,
    but then ``uncond`` must be passed explicitly.
    """

    def cat(self, other: Any) -> Any: ...

    def unconditional(self) -> Any: ...


def cat_conditioning(first: Any, second: Any) -> Any:
    """Batch-concatenate two conditioning objects (tensors or ``Conditioning``)."""
    if isinstance(first, Tensor):
        return torch.cat([first, second])
    if hasattr(first, "cat"):
        return first.cat(second)
    raise TypeError(
        f"cannot batch-concatenate conditioning of type {type(first).__name__}: "
        "guidance needs a tensor or an object with .cat(other)"
    )


def unconditional_of(cond: Any) -> Any:
    """The null conditioning for ``cond`` via its ``unconditional()`` method."""
    if hasattr(cond, "unconditional"):
        return cond.unconditional()
    raise TypeError(
        f"conditioning of type {type(cond).__name__} has no .unconditional(); pass uncond explicitly to use guidance"
    )


SPACINGS = ("mlmdm", "trailing")


def sampling_timesteps(num_train_steps: int, steps: int, spacing: str = "mlmdm") -> list[int]:
    """The n + 1 integer times of an n-step sampler, decreasing, ending at 0.

    "mlmdm": ``round(arange(n+1) * (T+1)/(n+1))`` reversed; "trailing": ``round(linspace(T, 0, n+1))``.
    Rounding is half-to-even, as numpy's (and ml-mdm's) ``round``.
    """
    if int(steps) != steps or not 1 <= steps <= num_train_steps:
        raise ValueError(f"steps must be an integer in [1, {num_train_steps}], got {steps}")
    if spacing == "mlmdm":
        ratio = (num_train_steps + 1) / (steps + 1)
        grid = torch.round(torch.arange(steps + 1, dtype=torch.float64) * ratio).flip(0)
    elif spacing == "trailing":
        grid = torch.round(torch.linspace(num_train_steps, 0, steps + 1, dtype=torch.float64))
    else:
        raise ValueError(f"unknown step spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    return [int(v) for v in grid.tolist()]


class _Denoiser:
    """Turns one network call at step t into thresholded x0 estimates for every level."""

    def __init__(
        self,
        model: PyramidModel,
        process: MatryoshkaDiffusion,
        cond: Any,
        uncond: Any,
        guidance: float | Sequence[float],
        guidance_interval: tuple[float, float] | None,
        clip_x0: bool,
        dynamic_threshold: float | None,
        dynamic_max: float | None,
    ) -> None:
        levels = process.num_levels
        if isinstance(guidance, Sequence):
            scales = [float(g) for g in guidance]
        else:
            scales = [float(guidance)] * levels
        if len(scales) != levels:
            raise ValueError(f"need one guidance scale per level ({levels}), got {len(scales)}")
        if guidance_interval is not None and not 0 <= guidance_interval[0] <= guidance_interval[1] <= 1:
            raise ValueError(f"guidance_interval needs 0 <= lo <= hi <= 1, got {guidance_interval}")
        self.model = model
        self.process = process
        self.cond = cond
        self.scales = scales
        self.interval = guidance_interval
        self.clip_x0 = clip_x0
        self.dynamic_threshold = dynamic_threshold
        self.dynamic_max = dynamic_max
        self.pair = None
        self.previous: list[Tensor] | None = None  # the last step's x0, a self-conditioning model's input
        if any(g != 1.0 for g in scales):
            if uncond is None:
                if cond is None:
                    raise ValueError("classifier-free guidance needs a conditioning (cond is None)")
                uncond = unconditional_of(cond)
            # Order [uncond, cond], as ml-mdm's forward_model.
            self.pair = cat_conditioning(uncond, cond)

    def _guided(self, t: int) -> bool:
        # Guidance only inside [lo, hi] of t/T (Kynkaanniemi et al. 2024, "Applying guidance in a
        # limited interval improves sample and distribution quality in diffusion models").
        if self.pair is None:
            return False
        if self.interval is None:
            return True
        u = t / self.process.num_steps
        return self.interval[0] <= u <= self.interval[1]

    def __call__(self, z: list[Tensor], t: int) -> list[Tensor]:
        batch = z[0].shape[0]
        t_vec = torch.full((batch,), t, dtype=torch.long, device=z[0].device)
        previous = self.previous if self.process.self_condition else None
        if self._guided(t):
            doubled = [torch.cat([zi, zi]) for zi in z]
            previous = None if previous is None else [torch.cat([e, e]) for e in previous]
            out = self.process.network_output(self.model, doubled, torch.cat([t_vec, t_vec]), self.pair, previous)
            # The parameterisations are affine in the output at a fixed z, so guiding
            # the raw output equals guiding x0, eps or v.
            preds = [u + g * (c - u) for (u, c), g in zip((o.chunk(2) for o in out), self.scales)]
        else:
            preds = self.process.network_output(self.model, z, t_vec, self.cond, previous)
        estimates = self.process.x0_estimates(preds, z, t_vec)
        # Clipped as in training, whatever thresholding the update uses. Both guidance branches get
        # the guided estimate: like z, it is the state of the one sample they both describe.
        self.previous = [x.clamp(-1, 1) for x in estimates]
        return [threshold_x0(x, self.clip_x0, self.dynamic_threshold, self.dynamic_max) for x in estimates]


_Update = Callable[[int, int, int, list[Tensor], list[Tensor]], list[Tensor]]


def _run(
    denoise: _Denoiser,
    noise: Sequence[Tensor],
    steps: int,
    callback: Callback | None,
    update: _Update,
    spacing: str,
) -> list[Tensor]:
    process = denoise.process
    if len(noise) != process.num_levels:
        raise ValueError(f"expected noise for {process.num_levels} levels, got {len(noise)}")
    if len({n.shape[0] for n in noise}) != 1:
        raise ValueError("all noise levels must have the same batch size")
    timesteps = sampling_timesteps(process.num_steps, steps, spacing)
    z = list(noise)
    for i in range(steps):
        t, s = timesteps[i], timesteps[i + 1]
        x0 = denoise(z, t)
        z = update(i, t, s, z, x0)
        if callback is not None:
            callback(i, steps, t, x0, z)
    return z


def _gammas(process: MatryoshkaDiffusion, t: int) -> list[float]:
    # All samples share t at each step, so the coefficients are python floats (float64).
    return [process.schedule_for_level(i).gammas[t].item() for i in range(process.num_levels)]


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _posterior_variance(g_t: float, g_s: float) -> float:
    """Variance of q(z_s | z_t, x0) for s < t: (1 - g_t/g_s) (1 - g_s) / (1 - g_t)."""
    return (g_s - g_t) / g_s * (1.0 - g_s) / (1.0 - g_t)


def level_etas(eta: float | Sequence[float], num_levels: int) -> list[float]:
    """One DDIM eta per level (highest resolution first) from one value or a per-level sequence.

    A sequence longer than ``num_levels`` gives its innermost (last) entries, so a run's setting also
    fits the model of an earlier stage, which has only the inner levels.
    """
    etas = [float(e) for e in eta] if isinstance(eta, Sequence) else [float(eta)] * num_levels
    if len(etas) < num_levels:
        raise ValueError(f"need one eta per level ({num_levels}), got {len(etas)}")
    if any(not (math.isfinite(e) and e >= 0) for e in etas):
        raise ValueError(f"eta must be >= 0, got {eta}")
    return etas[len(etas) - num_levels :]


@torch.no_grad()
def sample_ddpm(
    model: PyramidModel,
    noise: Sequence[Tensor],
    process: MatryoshkaDiffusion,
    steps: int,
    cond: Any = None,
    uncond: Any = None,
    guidance: float | Sequence[float] = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    *,
    guidance_interval: tuple[float, float] | None = None,
    clip_x0: bool = True,
    dynamic_threshold: float | None = None,
    dynamic_max: float | None = None,
    spacing: str = "mlmdm",
) -> list[Tensor]:
    """Ancestral sampling from the DDPM posterior q(z_s | z_t, x0_hat) (Ho et al. 2020, Eq. 6-7).

    With a = g_t/g_s and beta = 1 - a per level:
    z_s = beta sqrt(g_s)/(1-g_t) x0 + sqrt(a)(1-g_s)/(1-g_t) z_t + sqrt(beta (1-g_s)/(1-g_t)) n.
    """
    denoise = _Denoiser(
        model, process, cond, uncond, guidance, guidance_interval, clip_x0, dynamic_threshold, dynamic_max
    )

    def update(i: int, t: int, s: int, z: list[Tensor], x0: list[Tensor]) -> list[Tensor]:
        out = []
        for zi, xi, g_t, g_s in zip(z, x0, _gammas(process, t), _gammas(process, s)):
            beta = (g_s - g_t) / g_s
            coef_x0 = beta * math.sqrt(g_s) / (1 - g_t)
            coef_z = math.sqrt(1 - beta) * (1 - g_s) / (1 - g_t)
            zs = coef_x0 * xi + coef_z * zi
            var = _posterior_variance(g_t, g_s)
            out.append(zs + math.sqrt(var) * _randn_like(zi, generator) if var > 0 else zs)
        return out

    return _run(denoise, noise, steps, callback, update, spacing)


@torch.no_grad()
def sample_ddim(
    model: PyramidModel,
    noise: Sequence[Tensor],
    process: MatryoshkaDiffusion,
    steps: int,
    cond: Any = None,
    uncond: Any = None,
    guidance: float | Sequence[float] = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    *,
    guidance_interval: tuple[float, float] | None = None,
    clip_x0: bool = True,
    dynamic_threshold: float | None = None,
    dynamic_max: float | None = None,
    spacing: str = "mlmdm",
    eta: float | Sequence[float] = 0.0,
) -> list[Tensor]:
    """DDIM (Song et al. 2021, Eq. 12) with stochasticity eta; eta = 0 is deterministic.

    eps_hat = (z_t - sqrt(g_t) x0)/sqrt(1-g_t), var = min(eta^2 (1 - g_t/g_s)(1-g_s)/(1-g_t), 1 - g_s),
    z_s = sqrt(g_s) x0 + sqrt(1 - g_s - var) eps_hat + sqrt(var) n.
    eta = 1 gives the same update as ``sample_ddpm``. Above 1 each step replaces more of eps_hat by fresh
    noise (as EDM's churn does), at most all of it (the cap keeps z_s at its marginal variance): an
    undertrained model's errors are then not carried along (emoji64: docs/benchmarks.md, nineteenth round).
    A sequence gives each level its own eta, highest resolution first as the pyramid; of a longer one a
    model with fewer levels (an earlier stage) takes the innermost entries.
    """
    etas = level_etas(eta, process.num_levels)
    denoise = _Denoiser(
        model, process, cond, uncond, guidance, guidance_interval, clip_x0, dynamic_threshold, dynamic_max
    )

    def update(i: int, t: int, s: int, z: list[Tensor], x0: list[Tensor]) -> list[Tensor]:
        out = []
        for zi, xi, g_t, g_s, eta_i in zip(z, x0, _gammas(process, t), _gammas(process, s), etas):
            eps = (zi - math.sqrt(g_t) * xi) / math.sqrt(1 - g_t)
            var = min(eta_i**2 * _posterior_variance(g_t, g_s), 1 - g_s)
            zs = math.sqrt(g_s) * xi + math.sqrt(1 - g_s - var) * eps
            out.append(zs + math.sqrt(var) * _randn_like(zi, generator) if var > 0 else zs)
        return out

    return _run(denoise, noise, steps, callback, update, spacing)


@torch.no_grad()
def sample_dpmpp_2m(
    model: PyramidModel,
    noise: Sequence[Tensor],
    process: MatryoshkaDiffusion,
    steps: int,
    cond: Any = None,
    uncond: Any = None,
    guidance: float | Sequence[float] = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    *,
    guidance_interval: tuple[float, float] | None = None,
    clip_x0: bool = True,
    dynamic_threshold: float | None = None,
    dynamic_max: float | None = None,
    spacing: str = "mlmdm",
) -> list[Tensor]:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): multistep, data prediction, in
    lambda = log(alpha/sigma) = logSNR/2, with each level's own shifted lambda.

    h = lambda_s - lambda_t, z_s = (sigma_s/sigma_t) z_t - alpha_s (e^{-h} - 1) D with
    D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev, r = h_prev/h, and D = x0_t on the first
    step (no history) and the last step (lambda_0 = +inf, so z_0 = x0_t).
    Deterministic; ``generator`` is unused and accepted for the shared signature.
    """
    denoise = _Denoiser(
        model, process, cond, uncond, guidance, guidance_interval, clip_x0, dynamic_threshold, dynamic_max
    )
    history: list[tuple[Tensor, float]] = []  # per level: (x0, h) of the previous step

    def update(i: int, t: int, s: int, z: list[Tensor], x0: list[Tensor]) -> list[Tensor]:
        if s == 0:
            return list(x0)
        out, new_history = [], []
        levels = zip(z, x0, _gammas(process, t), _gammas(process, s))
        for level, (zi, xi, g_t, g_s) in enumerate(levels):
            lam_t = 0.5 * (math.log(g_t) - math.log1p(-g_t))
            lam_s = 0.5 * (math.log(g_s) - math.log1p(-g_s))
            h = lam_s - lam_t
            d = xi
            if history:
                prev_x0, prev_h = history[level]
                c = h / (2.0 * prev_h)  # 1/(2r), r = h_prev/h
                d = (1 + c) * xi - c * prev_x0
            ratio = math.sqrt((1 - g_s) / (1 - g_t))  # sigma_s / sigma_t
            out.append(ratio * zi - math.sqrt(g_s) * math.expm1(-h) * d)
            new_history.append((xi, h))
        history[:] = new_history
        return out

    return _run(denoise, noise, steps, callback, update, spacing)


SAMPLERS: dict[str, Callable[..., list[Tensor]]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpm++2m": sample_dpmpp_2m,
}


def get_sampler(name: str) -> Callable[..., list[Tensor]]:
    """Look a sampler up in :data:`SAMPLERS`."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
