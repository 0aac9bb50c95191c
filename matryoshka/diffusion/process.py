"""The multi-resolution forward process and training loss of MDM (paper §3.1, §3.3).

Levels are ordered HIGHEST RESOLUTION FIRST everywhere (ml-mdm's order): level 0
is the output resolution, level R-1 the base (innermost) one.

Timestep convention (ml-mdm, needed to load its checkpoints): training draws an
integer t uniformly from {1, ..., T}, noises with ``gammas[t]`` of each level's
(shifted) schedule, and feeds the network the time value ``t - 1``; samplers do the
same, so the network only ever sees times in [0, T-1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from .parameterisation import (
    LossWeighting,
    Prediction,
    check_prediction,
    convert_prediction,
    loss_weight,
    prediction_target,
)
from .schedules import NoiseSchedule
from .spacetime import check_frames, downsample, level_name, shift_ratio, upsample


class PyramidModel(Protocol):
    """The network's calling convention.

    ``z_list``: noisy levels, highest resolution first (with a mixed-resolution batch
    the first level may hold fewer samples than the others); ``t_model``: float
    tensor (B,); ``cond``: opaque conditioning passed through; a self-conditioning
    model also takes ``self_cond=`` x0 estimates shaped like ``z_list``. Returns one
    prediction per level, same order and shapes as ``z_list``.
    """

    def __call__(self, z_list: list[Tensor], t_model: Tensor, cond: Any, **self_cond: Any) -> list[Tensor]: ...


def first_samples(cond: Any, count: int) -> Any:
    """The conditioning of a batch's first ``count`` samples (None, a tensor, or an object with ``head``)."""
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond[:count]
    if hasattr(cond, "head"):
        return cond.head(count)
    raise TypeError(f"cannot take the first samples of conditioning of type {type(cond).__name__}")


# ----- the process ------------------------------------------------------------


class MatryoshkaDiffusion:
    """Joint diffusion over an R-level image pyramid (paper §3.1).

    Level i (0 = highest resolution) has side ``factor ** (R-1-i)`` times the base
    level's side and uses ``schedule.shifted(that ratio, shift_power)``. With
    ``num_levels=1`` this is an ordinary pixel-space diffusion model.

    Args:
        schedule: the base (innermost level) schedule.
        num_levels: R.
        factor: side ratio between adjacent levels (avg-pool kernel).
        shift_power: p in SNR_r = SNR / ratio**p. ml-mdm's released 64->256 model
            uses p = 1 (the default); its 1024 config uses p = 2.
        prediction: what the network outputs ("eps", "x0" or "v").
        loss_target: the parameterisation the MSE is taken in. ml-mdm predicts v and
            takes the MSE on eps recovered from v (an SNR-weighted x0 loss).
        level_weights: per-level loss weights, highest level first (default all 1).
        loss_on_all_levels: False = only the top level enters the loss.
        mixed_ratio: None, or the fraction m in (0, 1] of the batch for which the top
            level is computed (paper §3.3 mixed-resolution batches).
        loss_weighting: "none" (ml-mdm) or "min_snr" (each level by its own shifted SNR).
        min_snr_gamma: gamma of the min-SNR weighting.
        min_snr_floor: lower bound of min-SNR's x0 weight (see ``loss_weight``).
        time_logit_normal: None draws training times uniformly; (m, s) draws t/T as
            sigmoid(N(m, s²)) (Esser et al. 2024, §3.1), so positive m trains noisier times more.
        upsampled_residual: each outer level's output is read as a correction to the next
            lower level's x0 estimate upsampled (see ``network_output``).
        residual_upsampling: how that estimate is upsampled, "bicubic" or "bilinear".
        frames: None for images, else the frame count of every level, highest first, for
            clips (B, C, F, H, W) (the space-time pyramid of ``spacetime``).
        temporal_shift: count frames in the resolution shift (``spacetime.shift_ratio``).
        self_condition: the model takes x0 estimates (``ModelConfig.self_condition``): the
            loss feeds them to half of each batch, samplers their previous step's estimate.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_levels: int = 1,
        factor: int = 4,
        shift_power: float = 1.0,
        prediction: Prediction = "v",
        loss_target: Prediction = "eps",
        level_weights: Sequence[float] | None = None,
        loss_on_all_levels: bool = True,
        mixed_ratio: float | None = None,
        loss_weighting: LossWeighting = "none",
        min_snr_gamma: float = 5.0,
        min_snr_floor: float = 0.0,
        time_logit_normal: tuple[float, float] | None = None,
        upsampled_residual: bool = False,
        residual_upsampling: str = "bicubic",
        frames: Sequence[int] | None = None,
        temporal_shift: bool = False,
        self_condition: bool = False,
    ) -> None:
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        if int(factor) != factor or factor < 2:
            raise ValueError(f"factor must be an integer >= 2, got {factor}")
        check_prediction(prediction)
        check_prediction(loss_target)
        if level_weights is None:
            level_weights = [1.0] * num_levels
        if len(level_weights) != num_levels:
            raise ValueError(f"need {num_levels} level weights, got {len(level_weights)}")
        if mixed_ratio is not None and not 0 < mixed_ratio <= 1:
            raise ValueError(f"mixed_ratio must be None or in (0, 1], got {mixed_ratio}")
        self.frames = None if frames is None else check_frames(frames)
        if self.frames is not None and len(self.frames) != num_levels:
            raise ValueError(f"need {num_levels} frame counts (highest level first), got {self.frames}")
        self.temporal_shift = temporal_shift
        self.schedule = schedule
        self.num_levels = num_levels
        self.factor = int(factor)
        self.shift_power = float(shift_power)
        self.prediction: Prediction = prediction
        self.loss_target: Prediction = loss_target
        self.level_weights = [float(w) for w in level_weights]
        self.loss_on_all_levels = loss_on_all_levels
        self.mixed_ratio = mixed_ratio
        if loss_weighting not in ("none", "min_snr"):
            raise ValueError(f"unknown loss weighting {loss_weighting!r}; valid: none, min_snr")
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive, got {min_snr_gamma}")
        self.loss_weighting: LossWeighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)
        if not 0 <= min_snr_floor <= min_snr_gamma:
            raise ValueError(f"min_snr_floor must be in [0, min_snr_gamma={min_snr_gamma}], got {min_snr_floor}")
        self.min_snr_floor = float(min_snr_floor)
        if time_logit_normal is not None and (len(time_logit_normal) != 2 or time_logit_normal[1] <= 0):
            raise ValueError(f"time_logit_normal must be (mean, std > 0), got {time_logit_normal}")
        self.time_logit_normal = None if time_logit_normal is None else tuple(map(float, time_logit_normal))
        self.upsampled_residual = upsampled_residual
        if residual_upsampling not in ("bicubic", "bilinear"):
            raise ValueError(f"unknown residual_upsampling {residual_upsampling!r}; valid: bicubic, bilinear")
        self.residual_upsampling = residual_upsampling
        self.self_condition = self_condition
        self._level_schedules = tuple(
            schedule.shifted(self.shift_ratio(i), self.shift_power) for i in range(num_levels)
        )

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    def level_ratio(self, level: int) -> int:
        """Side of ``level`` divided by the base level's side."""
        return self.factor ** (self.num_levels - 1 - level)

    def frame_stride(self, level: int) -> int:
        """Frames of ``level`` per frame of the level below it (1 for images and the base level)."""
        if self.frames is None or level == self.num_levels - 1:
            return 1
        return self.frames[level] // self.frames[level + 1]

    def shift_ratio(self, level: int) -> float:
        """s_r of ``level``'s shifted schedule (the side ratio for images)."""
        if self.frames is None:
            return self.level_ratio(level)
        return shift_ratio(self.level_ratio(level), self.frames[level] / self.frames[-1], self.temporal_shift)

    def schedule_for_level(self, level: int) -> NoiseSchedule:
        return self._level_schedules[level]

    def coefficients(self, level: int, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha, sigma) of ``level`` at integer times t (B,), shaped (B, 1, ..., 1)
        to broadcast against ``like`` and cast to its dtype."""
        sched = self._level_schedules[level]
        t = t.to(like.device)
        shape = (-1,) + (1,) * (like.ndim - 1)
        alpha = sched.alpha(t).to(like.dtype).view(shape)
        sigma = sched.sigma(t).to(like.dtype).view(shape)
        return alpha, sigma

    def pyramid(self, x: Tensor) -> list[Tensor]:
        """Data pyramid (x^1, ..., x^R), x^{r+1} = avg_pool(x^r, factor), highest first.

        Clips (B, C, F, H, W) also keep every ``frame_stride``-th frame per level (``spacetime``).
        """
        if self.frames is None and x.ndim != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        if self.frames is not None and (x.ndim != 5 or x.shape[2] != self.frames[0]):
            raise ValueError(f"expected clips (B, C, {self.frames[0]}, H, W), got shape {tuple(x.shape)}")
        total = self.factor ** (self.num_levels - 1)
        if x.shape[-2] % total or x.shape[-1] % total:
            raise ValueError(
                f"image size {tuple(x.shape[-2:])} is not divisible by {total} "
                f"({self.num_levels} levels, factor {self.factor})"
            )
        levels = [x]
        for level in range(self.num_levels - 1):
            levels.append(downsample(levels[-1], self.factor, self.frame_stride(level)))
        return levels

    def initial_noise(
        self,
        batch_size: int,
        channels: int,
        height: int,
        width: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> list[Tensor]:
        """Independent N(0, I) noise for every level; (height, width) is the top level's size
        (with the process's frame counts for a video pyramid)."""
        width = height if width is None else width
        total = self.factor ** (self.num_levels - 1)
        if height % total or width % total:
            raise ValueError(f"size {(height, width)} is not divisible by {total}")
        frames = [()] * self.num_levels if self.frames is None else [(f,) for f in self.frames]
        return [
            torch.randn(
                (batch_size, channels, *frames[i], height // f, width // f),
                generator=generator,
                device=device,
                dtype=dtype,
            )
            for i, f in enumerate(self.factor**i for i in range(self.num_levels))
        ]

    def sample_timesteps(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Integer t in {1, ..., T}, one per sample: uniform, or t/T logit-normal (rounded up)."""
        if self.time_logit_normal is None:
            return torch.randint(1, self.num_steps + 1, (batch_size,), generator=generator, device=device)
        mean, std = self.time_logit_normal
        u = torch.sigmoid(mean + std * torch.randn(batch_size, generator=generator, device=device))
        return (u * self.num_steps).ceil().long().clamp(1, self.num_steps)

    @staticmethod
    def model_time(t: Tensor) -> Tensor:
        """The network's time input for integer t: ``t - 1`` as float (ml-mdm convention)."""
        return (t - 1).to(torch.float32)

    def add_noise(self, pyramid: Sequence[Tensor], t: Tensor, noise: Sequence[Tensor]) -> list[Tensor]:
        """z^r = alpha_t^r x^r + sigma_t^r eps^r per level, one t per sample for all levels."""
        self._check_levels(pyramid)
        self._check_levels(noise)
        out = []
        for level, (x, eps) in enumerate(zip(pyramid, noise)):
            alpha, sigma = self.coefficients(level, t, x)
            out.append(alpha * x + sigma * eps)
        return out

    def network_output(
        self,
        model: PyramidModel,
        z: Sequence[Tensor],
        t: Tensor,
        cond: Any,
        self_cond: Sequence[Tensor] | None = None,
    ) -> list[Tensor]:
        """The model's predictions at integer times t (B,), in the process's parameterisation
        (``self_cond``: a self-conditioning model's x0 estimates, None for zeros).

        With ``upsampled_residual`` each outer level's raw output r is shifted by the
        prediction that the (clipped, upsampled) x0 estimate b of the level below
        would have at this z, so its x0 is b + (x0(r) - x0(0)): a zero output reproduces the
        lower level, and the outer network only learns the detail it adds (ml-mdm has this
        idea as its "residual" option, which divides b by the side ratio; we do not).
        """
        extra = {} if self_cond is None else {"self_cond": list(self_cond)}
        preds = list(model(list(z), self.model_time(t), cond, **extra))
        if not self.upsampled_residual or len(preds) != self.num_levels:
            return preds
        for level in reversed(range(self.num_levels - 1)):
            low_z = z[level + 1].float()
            alpha, sigma = self.coefficients(level + 1, t, low_z)
            low_x0 = convert_prediction(preds[level + 1].float(), self.prediction, "x0", low_z, alpha, sigma)
            k = preds[level].shape[0]
            base = upsample(
                low_x0.detach()[:k].clamp(-1, 1), self.factor, self.frame_stride(level), self.residual_upsampling
            )
            top_z = z[level].float()
            alpha, sigma = self.coefficients(level, t[:k], top_z)
            shift = convert_prediction(base.clamp(-1, 1), "x0", self.prediction, top_z, alpha, sigma)
            preds[level] = preds[level].float() + shift
        return preds

    def x0_estimates(self, preds: Sequence[Tensor], z: Sequence[Tensor], t: Tensor) -> list[Tensor]:
        """Every level's x0 from network outputs ``preds`` at z and integer times t (B,), in z's dtype."""
        out = []
        for level, (pred, zi) in enumerate(zip(preds, z)):
            alpha, sigma = self.coefficients(level, t[: zi.shape[0]], zi)
            out.append(convert_prediction(pred.to(zi.dtype), self.prediction, "x0", zi, alpha, sigma))
        return out

    def self_condition_inputs(self, model: PyramidModel, z: Sequence[Tensor], t: Tensor, cond: Any) -> list[Tensor]:
        """What a self-conditioning model is fed in training (Chen et al. 2023, §3): the first
        half of each level's samples (the batch is in random order) gets the clipped x0 estimates
        of a pass without gradients at the same z, the rest zeros, so every level learns the
        sampler's first step and the later ones. With a mixed-resolution batch that is half of
        the top level's k samples, not the first B/2 (which would cover all k when k <= B/2).
        A fixed half rather than Chen et al.'s coin per batch keeps the number of forward
        passes equal on every rank (DDP and FSDP communicate in each)."""
        inputs = [torch.zeros_like(zi) for zi in z]
        half = z[-1].shape[0] // 2
        if half == 0:
            return inputs
        head = [z[0][: z[0].shape[0] // 2], *(zi[:half] for zi in z[1:])]
        with torch.no_grad():
            preds = self.network_output(model, head, t[:half], first_samples(cond, half))
            estimates = self.x0_estimates(preds, head, t)
        for level, estimate in enumerate(estimates):
            inputs[level][: estimate.shape[0]] = estimate.clamp(-1, 1)
        return inputs

    def top_batch(self, batch_size: int) -> int:
        """Samples whose top level is computed: floor(m * B) for mixed ratio m, else B.

        A relative tolerance of 1e-9 absorbs float error (0.29 * 100 = 28.999...),
        and at least one sample is always kept.
        """
        if self.mixed_ratio is None:
            return batch_size
        return max(1, math.floor(self.mixed_ratio * batch_size * (1 + 1e-9)))

    def loss(
        self,
        model: PyramidModel,
        x: Tensor | Sequence[Tensor],
        cond: Any = None,
        generator: torch.Generator | None = None,
        t: Tensor | int | None = None,
        noise: Sequence[Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Training loss (paper §3.1) for images x (B, C, H, W), clips (B, C, F, H, W) or a ready pyramid.

        Per level r: the network output is converted to ``loss_target`` and
        l_r(b) = w_r(b) * mean over (C, [F,] H, W) of (pred - target)^2 for sample b, with
        w_r(b) = 1 or the min-SNR factor at that level's SNR (``loss_weight``). The loss is
        sum_r w_r * mean_b l_r(b) over the levels in the loss (all, or only the top).

        Mixed-resolution batches (``mixed_ratio`` m): only the first k = top_batch(B)
        samples of the top level go through the network, and the top level's term is
        the mean of l_0 over those k samples, i.e. (1/k) sum_{b<k} l_0(b). ml-mdm
        computes sum_{b<k} l_0(b) / (m*B), the same value whenever m*B is an integer.
        Lower levels always use the whole batch.

        ``t`` (integer in [1, T], scalar or (B,)) and ``noise`` (one tensor per
        level) are drawn from ``generator`` when not given; the generator must live
        on the device of x. Returns the scalar loss and, for logging, a dict of
        detached per-level mean losses (unweighted) keyed ``"loss/{H}x{W}"``,
        highest level first.
        """
        levels = list(x) if isinstance(x, (list, tuple)) else self.pyramid(x)
        self._check_levels(levels)
        batch = levels[0].shape[0]
        device = levels[0].device
        if t is None:
            t = self.sample_timesteps(batch, generator, device)
        t = torch.as_tensor(t, device=device).long().expand(batch)
        if bool(((t < 1) | (t > self.num_steps)).any()):
            raise ValueError(f"training timesteps must lie in [1, {self.num_steps}]")
        if noise is None:
            noise = [torch.randn(lv.shape, generator=generator, device=device, dtype=lv.dtype) for lv in levels]
        z = self.add_noise(levels, t, noise)
        k = self.top_batch(batch)
        z[0] = z[0][:k]
        self_cond = self.self_condition_inputs(model, z, t, cond) if self.self_condition else None
        preds = self.network_output(model, z, t, cond, self_cond)
        if len(preds) != self.num_levels or any(p.shape != zi.shape for p, zi in zip(preds, z)):
            raise ValueError(
                "the model must return one prediction per level with the shapes of its inputs: "
                f"got {[tuple(p.shape) for p in preds]} for inputs {[tuple(zi.shape) for zi in z]}"
            )

        total = torch.zeros((), device=device)
        logs: dict[str, Tensor] = {}
        for level, pred in enumerate(preds):
            n = pred.shape[0]
            # Loss in float32 even under autocast: bf16 squares lose too much.
            zi = z[level].float()
            alpha, sigma = self.coefficients(level, t[:n], zi)
            pred_t = convert_prediction(pred.float(), self.prediction, self.loss_target, zi, alpha, sigma)
            target = prediction_target(
                self.loss_target, levels[level][:n].float(), noise[level][:n].float(), alpha, sigma
            )
            weight = loss_weight(
                self.loss_target,
                self.schedule_for_level(level).log_snr(t[:n]).float(),
                self.loss_weighting,
                self.min_snr_gamma,
                self.min_snr_floor,
            )
            level_loss = (weight * (pred_t - target).pow(2).flatten(1).mean(1)).mean()
            logs[f"loss/{level_name(pred)}"] = level_loss.detach()
            if level == 0 or self.loss_on_all_levels:
                total = total + self.level_weights[level] * level_loss
            else:
                # Zero-weighted term keeps this output in the graph, so DDP does not
                # report the parameters that only feed it as unused.
                total = total + 0.0 * pred.sum()
        return total, logs

    def _check_levels(self, levels: Sequence[Tensor]) -> None:
        if len(levels) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} levels, got {len(levels)}")
