"""Discrete variance-preserving noise schedules and the MDM resolution shift.

A schedule is a table ``gammas`` of length ``T + 1`` with ``gammas[t] = alpha_t^2``,
``sigma_t^2 = 1 - gamma_t`` and ``gammas[0] = 1`` (clean data). This is the
representation of ml-mdm (``gammas`` in ``samplers.py``), so integer timesteps index
the table directly. Values are kept in float64: near t = 0 the shifted schedules
need ``1 - gamma`` down to ~1e-5, where float32 loses most digits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SCHEDULE_KINDS = ("squaredcos", "logsnr_cosine", "linear")


class NoiseSchedule:
    """A discrete variance-preserving schedule on the integer grid t = 0..T.

    Integer-time accessors (``gamma``, ``alpha``, ``sigma``, ``log_snr``) take an
    ``int`` or an integer tensor and return float64 tensors on that tensor's device.
    Continuous-time accessors (``*_at``) take u in [0, 1], which maps to the grid
    position u*T.
    """

    def __init__(self, gammas: Tensor, kind: str = "custom") -> None:
        gammas = torch.as_tensor(gammas, dtype=torch.float64).detach().cpu()
        if gammas.ndim != 1 or gammas.numel() < 2:
            raise ValueError("gammas must be a 1-D table of length T + 1 >= 2")
        if gammas[0] != 1.0:
            raise ValueError("gammas[0] must be 1 (t = 0 is the clean sample)")
        if not bool(((gammas > 0) & (gammas <= 1)).all()):
            raise ValueError("gammas must lie in (0, 1]")
        if not bool((gammas[1:] <= gammas[:-1]).all()):
            raise ValueError("gammas must be non-increasing in t")
        self.gammas = gammas
        self.kind = kind

    def __repr__(self) -> str:
        return f"NoiseSchedule(kind={self.kind!r}, num_steps={self.num_steps})"

    @property
    def num_steps(self) -> int:
        """T, the number of diffusion steps (the table has T + 1 entries)."""
        return self.gammas.numel() - 1

    @property
    def log_snrs(self) -> Tensor:
        """log(alpha^2 / sigma^2) on the whole grid; +inf at t = 0."""
        return torch.log(self.gammas) - torch.log1p(-self.gammas)

    # ----- integer time -------------------------------------------------------
    def gamma(self, t: int | Tensor) -> Tensor:
        t = torch.as_tensor(t)
        if t.is_floating_point():
            raise TypeError("integer timesteps expected")
        # MPS has no float64; everywhere else keep the table's precision.
        dtype = torch.float32 if t.device.type == "mps" else torch.float64
        return self.gammas.to(device=t.device, dtype=dtype)[t]

    def alpha(self, t: int | Tensor) -> Tensor:
        return self.gamma(t).sqrt()

    def sigma(self, t: int | Tensor) -> Tensor:
        return (1.0 - self.gamma(t)).sqrt()

    def log_snr(self, t: int | Tensor) -> Tensor:
        g = self.gamma(t)
        return torch.log(g) - torch.log1p(-g)

    # ----- resolution shift ---------------------------------------------------
    def shifted(self, ratio: float, power: float = 1.0) -> NoiseSchedule:
        """Schedule for a level whose side is ``ratio`` times the base level's side.

        SNR_r(t) = SNR(t) / ratio**power, i.e. logSNR_r = logSNR - power * ln(ratio)
        (MDM paper §3.1 "noise schedule"; ml-mdm ``get_schedule_shifted``). A larger
        image has more redundant pixels, so it needs more noise at the same t.
        """
        if ratio <= 0:
            raise ValueError(f"ratio must be positive, got {ratio}")
        return self.offset(-power * math.log(ratio))

    def offset(self, delta: float) -> NoiseSchedule:
        """The schedule with logSNR + ``delta`` at every t (positive: less noise)."""
        if delta == 0:
            return self
        # sigmoid(+inf) = 1 keeps gamma_0 = 1 exactly.
        return NoiseSchedule(torch.sigmoid(self.log_snrs + delta), kind=self.kind)


def squaredcos(num_steps: int = 1000) -> NoiseSchedule:
    """``squaredcos_cap_v2`` (diffusers; ml-mdm DEEPFLOYD, used by its released models).

    abar(s) = cos(((s + 0.008) / 1.008) * pi / 2)^2,
    beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999), gamma_t = prod_{i<t} (1 - beta_i).
    """
    _check_steps(num_steps)
    s = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    abar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    return _from_betas(betas, "squaredcos")


def logsnr_cosine(num_steps: int = 1000, logsnr_min: float = -5.0, logsnr_max: float = 5.0) -> NoiseSchedule:
    """Cosine schedule in log-SNR, truncated to [logsnr_min, logsnr_max] (ml-mdm COSINE).

    As in ml-mdm ``schedule_cosine``: for t = 1..T, with u = (t-1)/(T-1),
    logSNR = -2 ln tan(a*u + b), b = atan(exp(-logsnr_max/2)),
    a = atan(exp(-logsnr_min/2)) - b; so t = 1 sits at logsnr_max, t = T at logsnr_min.
    """
    _check_steps(num_steps)
    u = torch.linspace(0.0, 1.0, num_steps, dtype=torch.float64)
    b = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - b
    lam = -2.0 * torch.log(torch.tan(a * u + b))
    gammas = torch.cat([torch.ones(1, dtype=torch.float64), torch.sigmoid(lam)])
    return NoiseSchedule(gammas, kind="logsnr_cosine")


def linear(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
    """DDPM linear betas (Ho et al. 2020): beta_i evenly spaced in [beta_start, beta_end]."""
    _check_steps(num_steps)
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return _from_betas(betas, "linear")


def make_schedule(kind: str, num_steps: int = 1000) -> NoiseSchedule:
    """Build a schedule by name; ``kind`` is one of :data:`SCHEDULE_KINDS`."""
    builders = {"squaredcos": squaredcos, "logsnr_cosine": logsnr_cosine, "linear": linear}
    if kind not in builders:
        raise ValueError(f"unknown noise schedule {kind!r}; valid kinds: {', '.join(SCHEDULE_KINDS)}")
    return builders[kind](num_steps)


def _from_betas(betas: Tensor, kind: str) -> NoiseSchedule:
    # Sum of logs rather than cumprod: the same value, without drift over 1000 factors.
    gammas = torch.exp(torch.cumsum(torch.log1p(-betas), 0))
    return NoiseSchedule(torch.cat([torch.ones(1, dtype=torch.float64), gammas]), kind=kind)


def _check_steps(num_steps: int) -> None:
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
