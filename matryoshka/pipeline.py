"""From a configuration or a checkpoint to a model you can sample from, in plain Python.

    from matryoshka.pipeline import load_pipeline
    pipe = load_pipeline("runs/emoji64")          # a run directory or a checkpoint directory
    levels = pipe.generate(num=8, sampler="ddim", steps=50, seed=0)
    levels[0]                                     # (8, 3, 64, 64) images in [-1, 1]

A video run gives clips, one (B, C, F, H, W) tensor per level (docs/video.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from .checkpoints import checkpoint_info, load_into, load_tensors, resolve_checkpoint
from .config.presets import load_run_config
from .config.run import RunConfig, SampleConfig
from .diffusion.autoguidance import Autoguided
from .diffusion.process import MatryoshkaDiffusion
from .diffusion.samplers import get_sampler
from .diffusion.schedules import make_schedule
from .guides import GUIDES_DIR, first_guide, guide_snapshots, snapshot_levels
from .models import Conditioning, NestedUNet


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when present, else the CPU) or a device that exists on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if not count:
            raise ValueError(f"device {name!r}: CUDA is not available on this machine (use cpu or auto)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: this machine has {count} CUDA device(s), numbered from 0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available on this machine (use cpu or auto)")
    return device


def build_process(config: RunConfig, num_levels: int | None = None, one_frame: bool = False) -> MatryoshkaDiffusion:
    """The diffusion process over the model's pyramid (or its innermost ``num_levels``); ``one_frame``:
    of a video model's pyramid of one-frame clips (the images that joint training mixes in)."""
    diffusion = config.diffusion
    levels = num_levels or config.model.num_levels
    frames = [1] * levels if one_frame else config.model.frames[:levels][::-1]
    # The config lists levels innermost first; the process orders them as its outputs, highest first.
    weights = diffusion.level_loss_weights[:levels][::-1] if diffusion.level_loss_weights else None
    return MatryoshkaDiffusion(
        make_schedule(diffusion.schedule, diffusion.num_steps).offset(diffusion.logsnr_shift),
        num_levels=levels,
        factor=max(config.model.nest_ratio, 2),
        shift_power=diffusion.shift_power,
        prediction=diffusion.prediction,
        loss_target=diffusion.loss_target,
        level_weights=weights,
        loss_on_all_levels=diffusion.loss_on_all_levels,
        mixed_ratio=diffusion.mixed_ratio,
        loss_weighting=diffusion.loss_weighting,
        min_snr_gamma=diffusion.min_snr_gamma,
        min_snr_floor=diffusion.min_snr_floor,
        time_logit_normal=tuple(diffusion.time_logit_normal) if diffusion.time_logit_normal else None,
        residual_upsampling=diffusion.residual_upsampling,
        upsampled_residual=diffusion.upsampled_residual,
        frames=frames or None,
        temporal_shift=diffusion.temporal_shift,
        self_condition=config.model.self_condition,
    )


def load_encoder(config: RunConfig, device: torch.device):
    """The run's frozen text encoder (None for models without text conditioning)."""
    if config.text.encoder == "none":
        return None
    from .text import load_text_encoder

    encoder = load_text_encoder(
        config.text.encoder, config.text.max_length, device=device, mlmdm_compat=config.text.mlmdm_compat
    )
    if encoder.dim != config.model.text_dim:
        raise ValueError(
            f"text encoder '{config.text.encoder}' gives {encoder.dim}-d tokens but "
            f"model.text_dim={config.model.text_dim}"
        )
    return encoder


@dataclass
class Pipeline:
    model: NestedUNet
    process: MatryoshkaDiffusion
    config: RunConfig
    checkpoint: Path | None = None
    step: int = 0
    text_encoder: object | None = None
    class_names: list[str] = field(default_factory=list)
    """Names of the class labels, as saved with the run when it was trained (empty if unknown)."""
    train_seconds: float | None = None
    """Training time behind the checkpoint (the trainer's count: steps only), None if unknown."""
    guides: Path | None = None
    """The run's guide snapshots (``RUN/guides``), autoguidance's weak models; None if unknown."""
    _loaded_guides: dict[Path, torch.nn.Module] = field(default_factory=dict, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def resolution(self) -> int:
        """Side of the top level this model was trained for."""
        top = self.config.data.resolution
        dropped = self.config.model.num_levels - self.model.config.num_levels
        return top // (self.config.model.nest_ratio**dropped)

    def encode(self, prompts: list[str]) -> Conditioning:
        """Text conditioning for prompts (loads the run's text encoder on first use)."""
        if not self.model.config.text_dim:
            raise ValueError("this model has no text conditioning; prompts need a text-to-image model")
        if self.text_encoder is None:
            self.text_encoder = load_encoder(self.config, self.device)
        embedding = self.text_encoder.encode(list(prompts), device=self.device)
        return Conditioning(text=embedding.tokens, text_mask=embedding.mask)

    def condition(
        self, num: int, labels: list[int] | torch.Tensor | None = None, prompts: list[str] | None = None
    ) -> Conditioning | None:
        """Conditioning for ``num`` samples: class labels (cycled through the classes when not
        given) and/or prompts (cycled over the samples)."""
        text = None
        if prompts:
            text = self.encode([prompts[i % len(prompts)] for i in range(num)])
        elif self.model.config.text_dim:
            raise ValueError("this is a text-to-image model: give at least one prompt")
        labels_cond = self._labels(num, labels)
        if text is None:
            return labels_cond
        return Conditioning(
            labels=None if labels_cond is None else labels_cond.labels, text=text.text, text_mask=text.text_mask
        )

    def negative(self, cond: Conditioning, prompt: str) -> Conditioning:
        """The unconditional branch of guidance with ``prompt`` instead of the empty text."""
        negative = self.encode([prompt] * cond.batch_size)
        uncond = cond.unconditional()
        uncond.text, uncond.text_mask = negative.text, negative.text_mask
        return uncond

    def _labels(self, num: int, labels: list[int] | torch.Tensor | None) -> Conditioning | None:
        num_classes = self.model.config.num_classes
        if not num_classes:
            if labels is not None:
                raise ValueError("this model is not class-conditional: it takes no class labels")
            return None
        if labels is None:
            labels = torch.arange(num) % num_classes
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
        if labels.numel() == 1:
            labels = labels.expand(num)
        if labels.numel() != num or labels.max() >= num_classes or labels.min() < -1:
            raise ValueError(f"need {num} labels in [0, {num_classes}) (or -1 for unconditional)")
        return Conditioning(labels=labels.to(self.device))

    @torch.no_grad()
    def generate(
        self,
        num: int | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        guidance: float | list[float] | None = None,
        cond: Conditioning | None = None,
        uncond: Conditioning | None = None,
        seed: int | None = None,
        callback: Callable | None = None,
        **options,
    ) -> list[torch.Tensor]:
        """Sample ``num`` pyramids; returns every level, highest resolution first, in [-1, 1].

        ``options`` are fields of ``SampleConfig`` (``eta``, ``threshold``, ``threshold_percentile``,
        ``threshold_max``, ``guidance_interval``, ``negative_prompt``, ``spacing``) that override the
        run's ``sample`` settings, or other keyword arguments of the sampler.
        """
        settings, options = self._settings(sampler, options)
        num = num or (cond.batch_size if cond is not None and cond.batch_size else settings.num)
        guidance = settings.guidance if guidance is None else guidance
        guided = any(g != 1.0 for g in (guidance if isinstance(guidance, list) else [guidance]))
        has_text = cond is not None and cond.text is not None
        if uncond is None and guided and settings.negative_prompt is not None and has_text:
            uncond = self.negative(cond, settings.negative_prompt)
        generator = torch.Generator(self.device).manual_seed(settings.seed if seed is None else seed)
        noise = self.process.initial_noise(
            num, self.model.config.in_channels, self.resolution, generator=generator, device=self.device
        )
        self.model.eval()
        weak = self.guide_model(settings)
        model = self.model if weak is None else Autoguided(self.model, weak, settings.autoguidance)
        levels = get_sampler(settings.sampler)(
            model,
            noise,
            self.process,
            steps or settings.steps,
            cond=cond,
            uncond=uncond,
            guidance=guidance,
            generator=generator,
            callback=callback,
            **{**settings.sampler_options(), **options},
        )
        return [level.clamp(-1, 1) for level in levels]

    def guide_path(self, settings: SampleConfig) -> Path | None:
        """Which weak model autoguidance uses with these settings: None when it is off, or when the
        choice is automatic and the run kept no snapshot before this step (sampling is then unguided)."""
        if settings.autoguidance == 1.0:
            return None
        guide = settings.guide
        if guide is None:
            return None if self.guides is None else first_guide(self.guides, self.step)
        if str(guide).isdigit():
            snapshots = guide_snapshots(self.guides) if self.guides is not None else {}
            if int(guide) not in snapshots:
                kept = ", ".join(map(str, snapshots)) or "none"
                raise ValueError(f"guide {guide}: the run kept no guide snapshot of that step (it has: {kept})")
            return snapshots[int(guide)]
        path = Path(guide).expanduser()
        if not path.exists():
            raise ValueError(f"guide {guide}: no such guide snapshot, checkpoint or run directory")
        return path

    def guide_model(self, settings: SampleConfig) -> torch.nn.Module | None:
        """Autoguidance's weak model for these settings, loaded once; None without autoguidance."""
        path = self.guide_path(settings)
        if path is None:
            if settings.autoguidance != 1.0:
                where = self.guides if self.guides is not None else "this checkpoint's run"
                warnings.warn(
                    f"autoguidance {settings.autoguidance:g}: no guide snapshot before step {self.step} in "
                    f"{where}, so these samples are not autoguided (pass a guide, or train with "
                    "train.guide_snapshots)",
                    stacklevel=3,
                )
            return None
        key = path.resolve()
        if key not in self._loaded_guides:
            self._loaded_guides[key] = self._load_guide(path)
        return self._loaded_guides[key]

    def _load_guide(self, path: Path) -> torch.nn.Module:
        if path.is_file():
            levels = snapshot_levels(path)
            if levels > self.model.config.num_levels:
                raise ValueError(f"guide {path} has {levels} levels, more than the model it guides")
            return load_model(self.config, levels, path, self.device)
        other = load_pipeline(path, device=self.device)
        mine, theirs = self.model.config, other.model.config
        outer = mine.num_levels - theirs.num_levels
        problems = [
            text
            for text, bad in (
                ("it has more levels", outer < 0),
                ("its diffusion settings differ", other.config.diffusion != self.config.diffusion),
                (
                    "its resolution is not one of this model's levels",
                    other.resolution * mine.nest_ratio ** max(outer, 0) != self.resolution,
                ),
                (
                    "its conditioning differs",
                    (theirs.num_classes, theirs.text_dim) != (mine.num_classes, mine.text_dim),
                ),
            )
            if bad
        ]
        if problems:
            raise ValueError(f"guide {path} cannot guide this model: {'; '.join(problems)}")
        return other.model

    def sample_settings(self, sampler: str | None = None, **options) -> SampleConfig:
        """The run's sample settings with these overrides (``SampleConfig`` fields); a bad value or
        combination raises ValueError naming it, before anything is sampled."""
        settings, unknown = self._settings(sampler, dict(options))
        if unknown:
            raise ValueError(f"unknown sampling options {sorted(unknown)}; valid: the fields of SampleConfig")
        return settings

    def _settings(self, sampler: str | None, options: dict) -> tuple[SampleConfig, dict]:
        """The run's sample settings with the overrides among ``options``, and the other options."""
        names = {f.name for f in fields(SampleConfig)}
        overrides = {key: options.pop(key) for key in list(options) if key in names and options[key] is not None}
        if sampler:
            overrides["sampler"] = sampler
        if "threshold" in overrides:  # a new mode starts from its own percentile and cap
            overrides.setdefault("threshold_percentile", None)
            overrides.setdefault("threshold_max", None)
        if "sampler" in overrides and overrides["sampler"] != "ddim":
            overrides.setdefault("eta", 0.0)  # eta is DDIM's; other samplers have none
        return replace(self.config.sample, **overrides), options


def load_model(config: RunConfig, num_levels: int, weights: Path, device: torch.device) -> NestedUNet:
    """The run's model truncated to ``num_levels`` levels with ``weights``, on ``device``, ready to sample."""
    model = NestedUNet(config.model.truncated(num_levels))
    load_into(model, load_tensors(weights), weights)
    model = model.to(device).eval()
    if config.train.channels_last is not False:  # sampling runs in fp32, where channels-last never costs
        model.to(memory_format=torch.channels_last)
    return model


def load_pipeline(path: str | Path, use_ema: bool = True, device: str | torch.device = "auto") -> Pipeline:
    """Load a run directory (its latest checkpoint) or one checkpoint directory for sampling."""
    checkpoint = resolve_checkpoint(path)
    config = load_run_config(checkpoint / "config.yaml")
    info = checkpoint_info(checkpoint)
    num_levels = int(info["num_levels"] or config.model.num_levels)
    weights = checkpoint / ("ema.safetensors" if use_ema else "model.safetensors")
    model = load_model(config, num_levels, weights, pick_device(device) if isinstance(device, str) else device)
    process = build_process(config, num_levels)
    in_run = checkpoint.parent.name == "checkpoints"
    return Pipeline(
        model,
        process,
        config,
        checkpoint,
        info["step"],
        class_names=info["class_names"],
        train_seconds=info["train_seconds"],
        guides=checkpoint.parent.parent / GUIDES_DIR if in_run else None,
    )
