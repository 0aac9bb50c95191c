"""The configuration of a training run: model, diffusion process, data, optimisation, sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ..data.config import DataConfig, image_batch_size
from ..diffusion.thresholding import threshold_options
from ..models.config import ModelConfig
from .errors import ConfigError

Prediction = Literal["eps", "x0", "v"]
MAX_RESOLUTION = 4096
"""Beyond this a single training image at the top level takes hundreds of MB of activations per layer."""
MAX_LR = 1.0
"""AdamW steps move each weight by about lr: above 1 every update overwrites the weights."""


def _require_finite(values: dict[str, Any]) -> None:
    """YAML accepts .inf and .nan for floats; no training setting means anything with them."""
    for name, value in values.items():
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            raise ValueError(f"{name} must be a finite number, got {value}")


@dataclass
class DiffusionConfig:
    schedule: Literal["squaredcos", "logsnr_cosine", "linear"] = "squaredcos"
    num_steps: int = 1000
    logsnr_shift: float = 0.0
    """Added to the logSNR of every level at every t (positive: less noise). Schedules such as
    squaredcos were tuned for 32²-64² images; simple diffusion (Hoogeboom et al. 2023, §3.1)
    scales SNR by (64/d)² for side d, i.e. +2 ln(64/d): +2.77 for a 16² innermost level."""
    shift_power: float = 1.0
    """p in logSNR_r = logSNR - p ln(s_r): 1 as ml-mdm's released 256² model, 2 as its 1024² one."""
    prediction: Prediction = "v"
    loss_target: Prediction = "eps"
    loss_weighting: Literal["none", "min_snr"] = "none"
    """Per-sample loss weight: none (ml-mdm) or min-SNR-gamma (Hang et al. 2023), per level."""
    min_snr_gamma: float = 5.0
    min_snr_floor: float = 0.0
    """With min_snr: the x0 error's weight is clamp(SNR, floor, gamma); 1 keeps the noisy end trained."""
    time_logit_normal: list[float] = field(default_factory=list)
    """Training times: empty draws t uniformly; [m, s] draws t/T = sigmoid(N(m, s²)) (SD3's logit-normal)."""
    upsampled_residual: bool = False
    """Outer levels predict a correction to the upsampled x0 estimate of the level below."""
    residual_upsampling: Literal["bicubic", "bilinear"] = "bicubic"
    """How ``upsampled_residual`` upsamples that estimate (bilinear overshoots less at hard edges)."""
    level_loss_weights: list[float] = field(default_factory=list)
    """Loss weight per level, innermost (lowest resolution) first like ``model.levels``; empty: all 1."""
    loss_on_all_levels: bool = True
    mixed_ratio: float | None = None
    """Fraction of the batch whose top level is computed (paper §3.3); None = all."""
    temporal_shift: bool = False
    """Video: the shift ratio counts frames too, s_r = side ratio x sqrt(frame ratio) (docs/video.md)."""

    def __post_init__(self) -> None:
        _require_finite(vars(self))
        if self.num_steps < 2:
            raise ValueError("num_steps must be at least 2")
        if self.mixed_ratio is not None and not 0 < self.mixed_ratio <= 1:
            raise ValueError("mixed_ratio must be in (0, 1]")
        if any(w < 0 for w in self.level_loss_weights):
            raise ValueError("level_loss_weights must be non-negative")
        if self.min_snr_gamma <= 0:
            raise ValueError("min_snr_gamma must be positive")
        if not 0 <= self.min_snr_floor <= self.min_snr_gamma:
            raise ValueError("min_snr_floor must be in [0, min_snr_gamma]")
        if self.time_logit_normal and (len(self.time_logit_normal) != 2 or self.time_logit_normal[1] <= 0):
            raise ValueError("time_logit_normal must be empty or [mean, std] with std > 0")


@dataclass
class TrainConfig:
    steps: int = 3000
    max_minutes: float = 0.0
    """Stop (with a final checkpoint and samples) after this much training time; 0 = no limit."""
    batch_size: int = 32
    """Per-process batch size; the global batch is batch_size x processes x grad_accum."""
    grad_accum: int = 1
    lr: float = 3e-4
    lr_schedule: Literal["constant", "cosine", "linear", "cooldown"] = "constant"
    """After warm-up: constant, or a decay to min_lr_ratio over each stage's steps or, in a time-limited
    stage or run, over its minutes if they run out first ("cooldown": over their last cooldown_fraction)."""
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    """Floor of the decays as a fraction of lr."""
    cooldown_fraction: float = 0.2
    """The share of each stage's budget over which the "cooldown" schedule decays."""
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    ema_decay: float = 0.999
    ema_warmup: bool = True
    """Ramp the EMA decay as min(decay, (1 + n) / (10 + n)) so early averages are not stale."""
    ema_grown_hold_steps: int = 0
    """A level grown by a later stage restarts that ramp, with its decay kept at least 1 - 1/h: its average holds
    its initial weights (the upsampled inner image) for about h steps, while its own output is still speckle."""
    cond_drop_prob: float = 0.1
    """Probability of replacing a sample's condition by the null condition (trains guidance)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on CUDA, and on CPUs with native bf16 where it is measured faster; else fp32."""
    channels_last: bool | None = None
    """Keep convolution weights (and so activations) in channels-last layout. None (auto): on, except
    under bf16 autocast on a CPU with GroupNorm blocks, where its steps measured 15-18% slower (fp32: +7%
    to none; magnitude-preserving blocks under bf16: faster, docs/benchmarks.md's twenty-second round). Ignored under
    train.strategy=fsdp, which shards contiguous parameters only."""
    max_nonfinite_steps: int = 20
    """Stop (keeping the last good checkpoint) after this many non-finite steps in a row."""
    seed: int = 0
    device: str = "auto"
    log_every: int = 25
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    guide_snapshots: int = 0
    """Keep the EMA weights of this step and of every doubling of it (125: steps 125, 250, 500, ...) in
    RUN/guides, the weak models of autoguidance (``sample.autoguidance``); 0: none."""
    sample_every: int = 500
    compile: bool = False
    """torch.compile the model (a speed-up on GPUs; compile time dominates short CPU runs)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """How several processes (torchrun) share the work: replicated weights (DDP) or sharded (FSDP2)."""

    def __post_init__(self) -> None:
        _require_finite(vars(self))
        positive = (
            "steps",
            "batch_size",
            "grad_accum",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
            "sample_every",
            "max_nonfinite_steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr <= MAX_LR:
            raise ValueError(
                f"lr must be in (0, {MAX_LR}], got {self.lr} (AdamW learning rates are about 1e-5 to 1e-2)"
            )
        if not 0 <= self.cooldown_fraction <= 1:
            raise ValueError(f"cooldown_fraction must be in [0, 1], got {self.cooldown_fraction}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.max_minutes < 0:
            raise ValueError("max_minutes must be >= 0")
        non_negative = (self.warmup_steps, self.weight_decay, self.grad_clip, self.ema_grown_hold_steps)
        if min(*non_negative, self.guide_snapshots) < 0:
            raise ValueError(
                "warmup_steps, weight_decay, grad_clip, ema_grown_hold_steps and guide_snapshots must be >= 0"
            )
        if not 0 <= self.ema_decay < 1:
            raise ValueError("ema_decay must be in [0, 1)")
        if not 0 <= self.cond_drop_prob <= 1:
            raise ValueError("cond_drop_prob must be in [0, 1]")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError("betas must be two values in [0, 1)")


@dataclass
class TextConfig:
    """Frozen text encoder for text-to-image models (model.text_dim must equal its width)."""

    encoder: str = "none"
    """"none", "minilm" (offline default, 384-d), or a Hugging Face id / local path (e.g. google/flan-t5-xl)."""
    max_length: int = 77
    """Captions are truncated to this many tokens (never dropped)."""
    cache_dir: str | None = None
    """Where caption embeddings are cached (computed once, shared by runs and ranks); None = no cache."""
    mlmdm_compat: bool | Literal["train", "sample"] = False
    """Tokenise like ml-mdm (FLAN-T5, see docs/text.md) for its checkpoints: true or "train" as its training
    reader (a space on both sides of the caption), "sample" as its sampling scripts (a leading space only)."""

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ValueError("max_length must be >= 1")


SAMPLER_OPTIONS = (
    "spacing",
    "eta",
    "threshold",
    "threshold_percentile",
    "threshold_max",
    "guidance_interval",
    "autoguidance",
    "guide",
)
"""The ``SampleConfig`` fields that `mdm sample` and `mdm eval` take as flags, beyond sampler, steps and guidance."""


@dataclass
class SampleConfig:
    """Defaults for sample grids during training and for ``mdm sample``."""

    sampler: Literal["ddpm", "ddim", "dpm++2m"] = "dpm++2m"
    steps: int = 25
    spacing: Literal["mlmdm", "trailing"] = "trailing"
    """Sampler time steps: "trailing" starts at t = T (pure noise); "mlmdm" is ml-mdm's grid."""
    num: int = 16
    guidance: float = 1.0
    seed: int = 0
    prompts: list[str] = field(default_factory=list)
    """Prompts of the sample grids during training (text models), cycled over the grid."""
    negative_prompt: str | None = None
    """Text of guidance's unconditional branch (text models; "" is ml-mdm's empty prompt, encoded);
    None: the empty, fully masked condition that training with caption dropout learns."""
    eta: float | list[float] = 0.0
    """DDIM stochasticity (Song et al. 2021, Eq. 16): 0 is deterministic, 1 the DDPM posterior variance, above 1
    more fresh noise per step (at most a full renoising of the x0 estimate). A list gives one per level,
    innermost first as ``model.levels``; the model of an earlier stage takes its first entries."""
    threshold: Literal["none", "clip", "dynamic", "dynamic_if"] = "clip"
    """What each step's x0 estimate goes through: nothing; clipping to [-1, 1]; dynamic thresholding
    as Imagen (Saharia et al. 2022, §2.3: s = 99.5th percentile of |x0|, at least 1) or as
    DeepFloyd IF (95th percentile, s at most 1.5)."""
    threshold_percentile: float | None = None
    """Percentile of |x0| that sets s in the dynamic modes (default 0.995 / 0.95 for dynamic / dynamic_if)."""
    threshold_max: float | None = None
    """Cap on s in the dynamic modes (default: none for dynamic, 1.5 for dynamic_if; ml-mdm's DYNAMIC: 100)."""
    guidance_interval: list[float] | None = None
    """[lo, hi]: guide only the steps with lo <= t/T <= hi (Kynkaanniemi et al. 2024); None: every step."""
    autoguidance: float = 1.0
    """Autoguidance weight w (Karras et al. 2024): every prediction becomes weak + w (strong - weak), the
    weak model being ``guide``; 1: off. Unlike ``guidance`` it needs no condition."""
    guide: str | None = None
    """Autoguidance's weak model: a step of the run's guide snapshots (RUN/guides, see
    ``train.guide_snapshots``), a snapshot file, or a checkpoint or run directory of a model with the
    same diffusion settings; None: the run's first snapshot (the weakest; on emoji64 the best guide at 10,
    30 and 60 minutes, docs/benchmarks.md)."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.num < 1:
            raise ValueError("steps and num must be >= 1")
        etas = self.eta if isinstance(self.eta, list) else [self.eta]
        if not etas or any(not (math.isfinite(e) and e >= 0) for e in etas):
            raise ValueError(f"eta must be a number >= 0 or a non-empty list of them (one per level), got {self.eta}")
        if any(etas) and self.sampler != "ddim":
            raise ValueError(f"eta applies to the ddim sampler only (sampler is {self.sampler!r})")
        threshold_options(self.threshold, self.threshold_percentile, self.threshold_max)
        interval = self.guidance_interval
        if interval is not None and (len(interval) != 2 or not 0 <= interval[0] <= interval[1] <= 1):
            raise ValueError(f"guidance_interval must be [lo, hi] with 0 <= lo <= hi <= 1, got {interval}")
        if not (math.isfinite(self.autoguidance) and self.autoguidance >= 0):
            raise ValueError(f"autoguidance must be a finite number >= 0 (1 = off), got {self.autoguidance}")

    def sampler_options(self) -> dict[str, Any]:
        """Keyword arguments of the samplers (matryoshka.diffusion.samplers) for these settings."""
        options: dict[str, Any] = {
            "spacing": self.spacing,
            **threshold_options(self.threshold, self.threshold_percentile, self.threshold_max),
            "guidance_interval": None if self.guidance_interval is None else tuple(self.guidance_interval),
        }
        if self.sampler == "ddim":  # the samplers list levels highest resolution first
            options["eta"] = self.eta[::-1] if isinstance(self.eta, list) else self.eta
        return options

    def recorded_options(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """``overrides`` and what a record of samples names even when the run's config set it: DDIM's eta."""
        return {**overrides, "eta": self.eta} if self.sampler == "ddim" else dict(overrides)


@dataclass
class EvalConfig:
    """Periodic evaluation during training (on rank 0), logged to metrics.jsonl and TensorBoard."""

    every: int = 0
    """Evaluate every this many steps (and at the end); 0 disables."""
    num: int = 256
    reference: str = "train"
    """"train" (the run's data), "emoji", an image folder, or a stats .npz from ``mdm eval-stats``;
    for video runs "train", "emoji-motion" or a folder of videos."""
    max_reference: int | None = None
    """Reference images (clips) read when ``reference`` is data: a seeded subset, or all (None)."""
    feature: str = "effnet-lite0"
    metrics: list[str] = field(default_factory=lambda: ["fd"])
    sampler: Literal["ddpm", "ddim", "dpm++2m"] | None = None
    steps: int | None = None
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.every < 0 or self.num < 2 or self.batch_size < 1:
            raise ValueError("every must be >= 0, num >= 2 and batch_size >= 1")
        if self.max_reference is not None and self.max_reference < 2:
            raise ValueError("max_reference must be at least 2 (or null: all of the reference data)")
        if "fvd" in self.metrics:
            raise ValueError("eval.metrics: fvd is not measured during training; use `mdm eval --metrics fvd`")


@dataclass
class StageConfig:
    """One stage of progressive training (paper §3.4): train the innermost ``levels`` levels."""

    levels: int = 1
    steps: int | None = None
    """Steps of this stage; only the last stage may leave it unset: it then runs until
    train.steps in total, so ``train.steps`` keeps setting the length of a progressive run."""
    batch_size: int | None = None
    """Per-process batch size of this stage (default: train.batch_size)."""
    lr: float | None = None
    """Learning rate of this stage (default: train.lr); warm-up restarts at each stage."""
    grown_lr: float | None = None
    """Learning rate of the levels this stage adds (default: ``lr``, which the levels of earlier
    stages keep): a freshly grown level learns from nothing while the inner ones only adapt."""
    mixed_ratio: float | None = None
    """Mixed-resolution fraction for this stage's top level (default: diffusion.mixed_ratio)."""
    freeze_inner: bool = False
    """Keep the levels trained in earlier stages fixed during this stage."""
    minutes: float | None = None
    """End this stage after this many minutes of training (counted across resumes) if its
    steps are not done by then, so a time-limited run splits its time the same on any machine."""

    def __post_init__(self) -> None:
        _require_finite(vars(self))
        if self.levels < 1 or (self.steps is not None and self.steps < 1):
            raise ValueError("levels and steps must be >= 1")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError("minutes must be positive")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        for name in ("lr", "grown_lr"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= MAX_LR:
                raise ValueError(f"{name} must be in (0, {MAX_LR}], got {value}")
        if self.mixed_ratio is not None and not 0 < self.mixed_ratio <= 1:
            raise ValueError("mixed_ratio must be in (0, 1]")


@dataclass
class RunConfig:
    run_dir: str = "runs/emoji64"
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    text: TextConfig = field(default_factory=TextConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stages: list[StageConfig] = field(default_factory=list)
    """Progressive training schedule; empty = one stage training all levels for train.steps."""
    init_from: str | None = None
    """Run or checkpoint whose (EMA) weights initialise the innermost levels of a new run."""

    def __post_init__(self) -> None:
        if not self.run_dir.strip():
            raise ValueError("run_dir is empty: name the directory of the run, e.g. run_dir=runs/my-run")
        if self.data.resolution > MAX_RESOLUTION:
            raise ValueError(
                f"data.resolution={self.data.resolution} is beyond the supported {MAX_RESOLUTION} "
                "(its activations would not fit in any accelerator's memory)"
            )
        levels, ratio = self.model.num_levels, self.model.nest_ratio
        total = ratio ** (levels - 1)
        if self.data.resolution % total:
            raise ValueError(
                f"data.resolution={self.data.resolution} is not divisible by {total} "
                f"({levels} levels nested by a factor {ratio})"
            )
        inner = self.data.resolution // total
        if inner % self.model.levels[0].downsampling:
            raise ValueError(
                f"data.resolution={self.data.resolution} makes the innermost level {inner}px, which its "
                f"{self.model.levels[0].downsampling}x downsampling (model.levels.0.channels) cannot divide"
            )
        clip = self.model.frames[-1] if self.model.is_video else 0
        if self.data.frames != clip:
            raise ValueError(
                f"data.frames={self.data.frames} must equal the top level's frames ({clip}: the last of model.frames, "
                "0 for an image model)"
            )
        if self.diffusion.level_loss_weights and len(self.diffusion.level_loss_weights) != levels:
            raise ValueError(f"diffusion.level_loss_weights needs {levels} values (one per level, innermost first)")
        if isinstance(self.sample.eta, list) and len(self.sample.eta) != levels:
            raise ValueError(f"sample.eta needs one number or {levels} (one per level, innermost first)")
        if self.data.label != "none" and not self.model.num_classes:
            raise ValueError(f"data.label={self.data.label!r} gives class labels: set model.num_classes")
        if (self.text.encoder != "none") != bool(self.model.text_dim):
            raise ValueError("text.encoder and model.text_dim go together: set both (text-to-image) or neither")
        if self.text.encoder != "none" and not self.data.captions:
            raise ValueError("text.encoder needs captions: set data.captions=true")
        if self.stages and self.train.strategy == "fsdp":
            raise ValueError(
                "train.strategy=fsdp does not support progressive stages yet; use train.strategy=ddp or stages=[]"
            )
        if self.stages:
            if any(stage.steps is None for stage in self.stages[:-1]):
                raise ValueError("every stage but the last needs its steps (the last one may run until train.steps)")
            earlier = sum(stage.steps for stage in self.stages[:-1])
            if self.stages[-1].steps is None and earlier >= self.train.steps:
                raise ValueError(
                    f"the stages before the last take {earlier} steps, which leaves none of "
                    f"train.steps={self.train.steps} "
                    "for the last one: raise train.steps or give the last stage its own steps"
                )
            if self.stages[0].grown_lr is not None:
                raise ValueError("stages.0.grown_lr: the first stage grows no level (set its lr instead)")
            counts = [stage.levels for stage in self.stages]
            if counts != sorted(set(counts)) or counts[-1] != levels:
                raise ValueError(
                    f"stages must grow strictly and end with all {levels} model levels; got levels {counts}"
                )
        for stage in self.resolved_stages():  # joint image and video training: images and clips in every batch
            image_batch_size(stage.batch_size, self.data.image_fraction)

    def resolved_stages(self) -> list[StageConfig]:
        """The stage schedule with defaults filled in (one stage when none is configured)."""
        stages = self.stages or [StageConfig(levels=self.model.num_levels, steps=self.train.steps)]
        earlier = sum(stage.steps or 0 for stage in stages[:-1])
        return [
            StageConfig(
                levels=stage.levels,
                steps=stage.steps or self.train.steps - earlier,
                batch_size=stage.batch_size or self.train.batch_size,
                lr=stage.lr or self.train.lr,
                grown_lr=stage.grown_lr or stage.lr or self.train.lr,
                mixed_ratio=stage.mixed_ratio if stage.mixed_ratio is not None else self.diffusion.mixed_ratio,
                freeze_inner=stage.freeze_inner,
                minutes=stage.minutes,
            )
            for stage in stages
        ]

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.resolved_stages())


def upgrade_run_data(data: dict[str, Any]) -> dict[str, Any]:
    """Keys of configs saved by earlier versions: dropped where harmless, refused where meaning changed."""
    model, diffusion = data.get("model"), data.get("diffusion")
    if isinstance(model, dict) and model.get("spatial_dims", 2) == 2:
        model.pop("spatial_dims", None)  # always 2: images, and video through per-frame 2-D layers
    if isinstance(diffusion, dict) and "level_weights" in diffusion:
        old = diffusion.pop("level_weights")
        if old:
            innermost_first = list(reversed(old)) if isinstance(old, list) else old
            raise ConfigError(
                "diffusion.level_weights (highest resolution first) is replaced by diffusion.level_loss_weights, "
                f"innermost level first like model.levels: write diffusion.level_loss_weights={innermost_first}",
                "diffusion.level_weights",
            )
    return data
