"""Model architectures by name: ml-mdm's released ones, and small ones for CPUs and tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from .config import LevelConfig, ModelConfig

FLAN_T5_XL_DIM = 2048


def _mlmdm_64_level() -> LevelConfig:
    """ml-mdm cc12m_64x64: the innermost 64² UNet of all released models (461.4M parameters)."""
    return LevelConfig(
        channels=[256, 512, 768],
        res_blocks=[2, 2, 2],
        attention_stages=[1, 2],
        attention_layers=[0, 1, 5],
        attention_ffn=True,
        micro_conditioning={"scale": 64},
    )


def _mlmdm_outer_level(channels: list[int], scale: int, normalize_input: bool) -> LevelConfig:
    return LevelConfig(
        channels=channels,
        res_blocks=[2, 2, 1],
        mid_attention=False,
        normalize_input=normalize_input,
        micro_conditioning={"scale": scale},
    )


def _mlmdm(levels: list[LevelConfig]) -> ModelConfig:
    # The released 64² model attends to padding tokens (masked_cross_attention: 0).
    return ModelConfig(
        levels=levels,
        time_embed_dim=1024,
        text_dim=FLAN_T5_XL_DIM,
        text_proj_dim=FLAN_T5_XL_DIM,
        text_attention_mask=False,
    )


def mlmdm_64() -> ModelConfig:
    return _mlmdm([_mlmdm_64_level()])


def mlmdm_256() -> ModelConfig:
    # ml-mdm's outermost level skips input normalisation (skip_normalization: true).
    return _mlmdm([_mlmdm_64_level(), _mlmdm_outer_level([64, 128, 256], 256, normalize_input=False)])


def mlmdm_1024() -> ModelConfig:
    return _mlmdm(
        [
            _mlmdm_64_level(),
            _mlmdm_outer_level([64, 128, 256], 256, normalize_input=True),
            _mlmdm_outer_level([32, 32, 64], 1024, normalize_input=False),
        ]
    )


def tiny(num_levels: int = 2) -> ModelConfig:
    """About 0.2M parameters: for tests. A 16² top level nests an 8², and so on."""
    inner = LevelConfig(channels=[16, 32], res_blocks=[1], attention_stages=[1], norm_groups=8, attention_heads=4)
    outer = LevelConfig(channels=[8, 16], res_blocks=[1], norm_groups=4, mid_attention=False)
    return ModelConfig(levels=[inner] + [outer] * (num_levels - 1), time_embed_dim=32)


def emoji64(num_levels: int = 2, patch_size: int = 2) -> ModelConfig:
    """CPU-sized nested model (7.3M parameters; 8.3M with GroupNorm blocks): a 16² UNet inside a light 64² UNet.

    Shaped for learning per CPU-second (docs/benchmarks.md#learning-fast-on-a-cpu): one ResNet
    block per stage and attention only at 4² (and in the mid block) make the 16² UNet 1.5x
    faster than two blocks with attention at 8² too, and the 64² level is light because it
    only adds detail to the upsampled inner image (``diffusion.upsampled_residual``). It sees
    2x2 pixel patches: 32 and 64 channels at 32² and 16² train 1.4x faster than 16, 32 and 64
    at 64², 32² and 16² on this CPU, and learn as much per step; ``patch_size=1`` is the latter.
    """
    inner = LevelConfig(
        channels=[64, 128, 192],
        res_blocks=[1, 1, 1],
        attention_stages=[2],
        attention_layers=[1],
        attention_heads=4,
    )
    if patch_size == 2:
        outer = LevelConfig(channels=[32, 64], res_blocks=[1, 1], norm_groups=8, mid_attention=False, patch_size=2)
    elif patch_size == 1:
        outer = LevelConfig(channels=[16, 32, 64], res_blocks=[1, 1, 1], norm_groups=8, mid_attention=False)
    else:
        raise ValueError(f"emoji64's outer level has patch_size 1 or 2, got {patch_size}")
    return ModelConfig(levels=[inner] + [outer] * (num_levels - 1), time_embed_dim=256)


def unet64() -> ModelConfig:
    """A single-level 64² UNet of size comparable to ``emoji64``: the paper's baseline."""
    level = LevelConfig(
        channels=[48, 96, 144, 192],
        res_blocks=[1, 2, 2, 2],
        attention_stages=[2, 3],
        attention_heads=4,
        norm_groups=16,
    )
    return ModelConfig(levels=[level], time_embed_dim=256)


def tiny_video() -> ModelConfig:
    """``tiny`` for clips, for tests: 4 frames at 16² nested around 2 frames at 8², both space-time."""
    base = tiny(2)
    return ModelConfig(
        levels=[replace(level, temporal=True) for level in base.levels], time_embed_dim=32, frames=[2, 4]
    )


def emoji_video() -> ModelConfig:
    """CPU-sized video model: 8 frames at 32² (thin, space-time) around 4 frames at 8² (space-time).

    Where a clip moves is decided at the coarsest level, so that level is small and cheap: 4
    frames at 8² train at ~33 clips/s on 2 cores, and learn which way a prompt moves its sprite
    in about 15 minutes (docs/video.md#results); the outer level adds detail at 32² and mixes
    frames, refining the upsampled inner clip.
    """
    inner = LevelConfig(
        channels=[32, 64, 64], res_blocks=[1], attention_stages=[2], attention_heads=4, norm_groups=16, temporal=True
    )
    outer = LevelConfig(
        channels=[16, 32, 64], res_blocks=[1], norm_groups=8, attention_heads=4, mid_attention=False, temporal=True
    )
    return ModelConfig(levels=[inner, outer], time_embed_dim=128, frames=[4, 8])


MODEL_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny,
    "emoji64": emoji64,
    "unet64": unet64,
    "tiny-video": tiny_video,
    "emoji-video": emoji_video,
    "mlmdm-64": mlmdm_64,
    "mlmdm-256": mlmdm_256,
    "mlmdm-1024": mlmdm_1024,
}


def model_preset(name: str) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset '{name}'; choose from {', '.join(MODEL_PRESETS)}")
    return MODEL_PRESETS[name]()
