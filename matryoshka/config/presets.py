"""Named run configurations (``mdm presets`` lists them)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

from ..data.config import DataConfig
from ..models.presets import emoji64 as emoji64_model
from ..models.presets import emoji_video as emoji_video_model
from ..models.presets import tiny as tiny_model
from ..models.presets import tiny_video as tiny_video_model
from .loader import load_config
from .run import DiffusionConfig, RunConfig, SampleConfig, StageConfig, TextConfig, TrainConfig, upgrade_run_data

STAGE1_MINUTES = 8.0
"""How long ``emoji64`` trains its 16² UNet alone before growing (or 1250 steps, if sooner)."""
SESSION15_STAGE1_STEPS = 2000
"""The first stage's step cap of the GroupNorm recipe (``with_groupnorm_blocks``), as its results were measured."""
VIDEO_STAGE1_MINUTES = 36.0
"""How long ``emoji-video`` trains its 4-frame 8² level alone before growing (or 9000 steps, if sooner)."""


def tiny() -> RunConfig:
    """Seconds on a CPU: a 2-level 16²/8² model on the emoji set (for tests and smoke runs)."""
    return RunConfig(
        run_dir="runs/tiny",
        model=tiny_model(2),
        data=DataConfig(resolution=16),
        train=TrainConfig(steps=20, batch_size=8, warmup_steps=5, log_every=5, checkpoint_every=10, sample_every=10),
        sample=SampleConfig(steps=5, num=4),
    )


def emoji64() -> RunConfig:
    """Default: unconditional 64² nested around 16² on the built-in emoji, the fast CPU recipe."""
    # Each choice is measured in docs/benchmarks.md#learning-fast-on-a-cpu: progressive training
    # (the 16² UNet alone first, for at most STAGE1_MINUTES, in batches of 32), EDM2's
    # magnitude-preserving blocks (whose normalised weights want a rate near 4e-2), min-SNR
    # weighting, an outer level that refines the (bilinearly) upsampled inner image, and simple
    # diffusion's schedule shift: +2 ln 4 at the 16² level, none at the 64² one.
    # The grown 64² level's EMA holds its initial weights (the upsampled 16² image) for ~333 steps.
    # Samples are autoguided (weight 2) by the run's own EMA after 125 steps, its first guide snapshot.
    # The grown 64² level learns at the first stage's rate, the 16² level inside it at 0.15 of it
    # (a higher rate sets it back for its first hundreds of nested steps: seventeenth round);
    # it runs on 2x2 pixel patches (docs/benchmarks.md, sixteenth round). Samples take 100 stochastic DDIM
    # steps (17-27 FD better at 64² than deterministic DPM++(2M) in 100 steps: nineteenth round) with twice
    # the posterior's noise at 64² (at most a full renoising) and half of it at 16²: 1-11 FD (6.5 on average)
    # better at 64² after 30 minutes, and 2-9 at 16², than 1.5x at both (twentieth round).
    return RunConfig(
        run_dir="runs/emoji64",
        model=replace(emoji64_model(2), magnitude_preserving=True),
        diffusion=DiffusionConfig(
            loss_weighting="min_snr",
            upsampled_residual=True,
            residual_upsampling="bilinear",
            logsnr_shift=2 * math.log(4),
            shift_power=2.0,
        ),
        data=DataConfig(resolution=64),
        train=TrainConfig(
            steps=12000,
            batch_size=32,
            lr=4e-2,
            warmup_steps=50,
            log_every=25,
            checkpoint_every=500,
            sample_every=1000,
            ema_grown_hold_steps=333,
            guide_snapshots=125,
        ),
        stages=[
            StageConfig(levels=1, steps=1250, minutes=STAGE1_MINUTES),
            StageConfig(levels=2, batch_size=16, lr=6e-3, grown_lr=4e-2),
        ],
        sample=SampleConfig(sampler="ddim", eta=[0.5, 2.0], steps=100, autoguidance=2.0),
    )


def with_groupnorm_blocks(run: RunConfig) -> RunConfig:
    """``run`` with the GroupNorm UNet blocks, the 64² level on pixels, the first stage of up to 2,000 steps
    and the learning rates measured for them (1e-3, nested 3e-4 at every level), sampled without
    autoguidance in 25 steps (session 15's recipe).

    ``emoji64``'s text and class presets keep these blocks: their results were measured with them, and
    the magnitude-preserving blocks have no cross-attention.
    """
    pixel_levels = emoji64_model(run.model.num_levels, patch_size=1).levels
    first, *nested = run.stages
    return replace(
        run,
        model=replace(run.model, magnitude_preserving=False, levels=[*run.model.levels[:1], *pixel_levels[1:]]),
        sample=replace(run.sample, sampler="dpm++2m", eta=0.0, autoguidance=1.0, steps=25),
        train=replace(run.train, lr=1e-3, guide_snapshots=0),
        stages=[
            replace(first, steps=SESSION15_STAGE1_STEPS),
            *(stage if stage.lr is None else replace(stage, lr=3e-4, grown_lr=None) for stage in nested),
        ],
    )


def emoji64_class() -> RunConfig:
    """``emoji64`` conditioned on the 10 emoji groups, with 10% label dropout for guidance."""
    base = with_groupnorm_blocks(emoji64())
    return replace(
        base,
        run_dir="runs/emoji64-class",
        model=replace(base.model, num_classes=10),
        data=replace(base.data, label="group"),
        sample=replace(base.sample, guidance=2.0, num=20),
    )


EMOJI_PROMPTS = [
    "red heart",
    "green heart",
    "blue heart",
    "yellow heart",
    "smiling face with sunglasses",
    "cat face",
    "dog face",
    "red apple",
    "green apple",
    "car",
    "rocket",
    "flag: Japan",
    "grinning face",
    "pile of poo",
    "fire",
    "snowman",
]


def emoji64_text() -> RunConfig:
    """``emoji64`` conditioned on emoji names and colours ("red heart, red") via MiniLM (offline).

    10% caption dropout for guidance; with colour words in every caption (``data.colour_captions``)
    prompts' colours are followed after 30 minutes (docs/text.md).
    """
    base = with_groupnorm_blocks(emoji64())
    return replace(
        base,
        run_dir="runs/emoji64-text",
        model=replace(base.model, text_dim=384),
        data=replace(base.data, captions=True, colour_captions=True),
        text=TextConfig(encoder="minilm", max_length=32, cache_dir="~/.cache/matryoshka/text"),
        sample=replace(base.sample, guidance=3.0, num=16, prompts=list(EMOJI_PROMPTS)),
    )


def tiny_progressive() -> RunConfig:
    """``tiny`` trained progressively: 8² alone for 10 steps, then grown to 16²/8² for 10 steps."""
    base = tiny()
    return replace(
        base,
        run_dir="runs/tiny-progressive",
        stages=[StageConfig(levels=1, steps=10, batch_size=16), StageConfig(levels=2, steps=10, mixed_ratio=0.5)],
    )


def emoji64_progressive() -> RunConfig:
    """``emoji64`` with a fixed-step schedule: 16² alone for 1500 steps, then nested for 1500."""
    base = with_groupnorm_blocks(emoji64())
    return replace(
        base,
        run_dir="runs/emoji64-progressive",
        train=replace(base.train, batch_size=8, lr=1e-3),
        stages=[StageConfig(levels=1, steps=1500, batch_size=64), StageConfig(levels=2, steps=1500, mixed_ratio=0.5)],
    )


def tiny_video() -> RunConfig:
    """Seconds on a CPU: 4 frames at 16² nested around 2 frames at 8², on emoji-motion (for tests)."""
    base = tiny()
    return replace(
        base,
        run_dir="runs/tiny-video",
        model=tiny_video_model(),
        data=DataConfig(source="emoji-motion", resolution=16, frames=4),
        train=replace(base.train, batch_size=4),
    )


EMOJI_VIDEO_PROMPTS = [  # sprites among emoji-video's 64
    "grinning face moving left",
    "bear moving right",
    "eggplant moving up",
    "blue circle moving down",
    "grinning cat with smiling eyes growing",
    "lady beetle bouncing",
    "wrapped gift rotating",
    "flag: Wales moving left",
]


def emoji_video() -> RunConfig:
    """CPU demo: unconditional 8 frames at 32² around 4 frames at 8² on 64 sprites of emoji-motion."""
    # Progressive, like emoji64: the 4-frame 8² level, where motion is decided, trains alone first
    # (~4 steps/s on 2 cores against ~0.6 nested), then the 32² level grows around it.
    # 64 sprites: each is seen in every motion many times within the hour (docs/video.md#results).
    return RunConfig(
        run_dir="runs/emoji-video",
        model=emoji_video_model(),
        diffusion=DiffusionConfig(
            loss_weighting="min_snr", upsampled_residual=True, logsnr_shift=2 * math.log(4), shift_power=2.0
        ),
        data=DataConfig(source="emoji-motion", resolution=32, frames=8, sprites=64),
        train=TrainConfig(
            steps=12000, batch_size=8, lr=1e-3, warmup_steps=50, log_every=25, checkpoint_every=500, sample_every=1000
        ),
        stages=[
            StageConfig(levels=1, steps=9000, minutes=VIDEO_STAGE1_MINUTES),
            StageConfig(levels=2, lr=3e-4),
        ],
        sample=SampleConfig(num=8),
    )


def emoji_video_text() -> RunConfig:
    """``emoji-video`` conditioned on captions ("bear moving right") through MiniLM (offline)."""
    base = emoji_video()
    return replace(
        base,
        run_dir="runs/emoji-video-text",
        model=replace(base.model, text_dim=384),
        data=replace(base.data, captions=True),
        text=TextConfig(encoder="minilm", max_length=32, cache_dir="~/.cache/matryoshka/text"),
        sample=replace(base.sample, guidance=3.0, prompts=list(EMOJI_VIDEO_PROMPTS)),
    )


DEFAULT_PRESET = "emoji64"
RUN_PRESETS: dict[str, Callable[[], RunConfig]] = {
    "tiny": tiny,
    "emoji64": emoji64,
    "emoji64-class": emoji64_class,
    "emoji64-text": emoji64_text,
    "tiny-progressive": tiny_progressive,
    "emoji64-progressive": emoji64_progressive,
    "tiny-video": tiny_video,
    "emoji-video": emoji_video,
    "emoji-video-text": emoji_video_text,
}


def describe_presets() -> list[tuple[str, str]]:
    return [(name, (factory.__doc__ or "").strip().splitlines()[0]) for name, factory in RUN_PRESETS.items()]


def load_run_config(source: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """A run config from a preset name or YAML file (default ``emoji64``) and overrides."""
    return load_config(RunConfig, source or DEFAULT_PRESET, overrides, RUN_PRESETS, upgrade=upgrade_run_data)
