"""Typed configuration of the NestedUNet.

``ModelConfig.levels`` lists the UNets from the innermost (lowest resolution) outward,
so that progressive training can build the model from a prefix of the list. Tensors,
on the other hand, are always ordered highest resolution first, as in ml-mdm.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LevelConfig:
    """One UNet of the nest (SPEC §4)."""

    channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    """Width of each stage; stage i runs at 1/2**i of the level's resolution."""
    res_blocks: list[int] = field(default_factory=lambda: [2, 2, 2])
    """ResNet blocks per stage on the way down (the up path has one more)."""
    attention_stages: list[int] = field(default_factory=list)
    """Stages (indices into ``channels``) whose ResNet blocks are followed by attention."""
    attention_layers: list[int] = field(default_factory=lambda: [1])
    """Attention layers after each ResNet block of an attention stage: one value, or one per stage."""
    attention_heads: int = 8
    attention_ffn: bool = False
    """Feed-forward block (GN -> 1x1 -> GELU -> zero-init 1x1) after each attention layer."""
    mid_attention: bool = True
    """Attention in the mid block (only the innermost level has mid blocks)."""
    dropout: float = 0.0
    norm_groups: int = 32
    attention_norm_groups: int | None = None
    """GroupNorm groups of the attention and feed-forward layers (default: ``norm_groups``).
    ml-mdm and the diffusers port hard-code 32 there whatever their ``num_groups_norm``."""
    normalize_input: bool = False
    """Divide this level's noisy input by its per-sample std (ml-mdm ``skip_normalization=False``)."""
    micro_conditioning: dict[str, float] = field(default_factory=dict)
    """Micro-conditioning keys with default values, e.g. ``{"scale": 64}`` (ml-mdm ``scale:64``)."""
    temporal: bool = False
    """Space-time level (video): a temporal convolution and temporal self-attention after every
    ResNet block (``temporal.py``); False keeps the level spatial-only (frames are independent)."""
    patch_size: int = 1
    """Outermost level only: side of the pixel patches its first convolution sees (pixel-unshuffle in, shuffle out):
    2 runs a 64² level's stages from 32², with p² more input channels (simple diffusion's patching).
    On a CPU, wide convolutions at a lower resolution do more per second than thin ones at full side."""
    frame_embedding: bool = False
    """Video: add an embedding of each frame's place in the clip to the time embedding (zero at
    initialisation), so the spatial layers know which frame they draw: "moving left" then says
    where the sprite is in frame f without waiting for the temporal layers to carry it."""

    def __post_init__(self) -> None:
        if not self.channels:
            raise ValueError("channels must list at least one stage width")
        stages = len(self.channels)
        if len(self.attention_layers) == 1:
            self.attention_layers = self.attention_layers * stages
        if len(self.res_blocks) == 1:
            self.res_blocks = self.res_blocks * stages
        for name in ("res_blocks", "attention_layers"):
            if len(getattr(self, name)) != stages:
                raise ValueError(f"{name} must have one value or one per stage ({stages})")
        for stage in self.attention_stages:
            if not 0 <= stage < stages:
                raise ValueError(f"attention_stages has {stage}, but there are only {stages} stages")
        for width in self.channels:
            if width % self.norm_groups:
                raise ValueError(f"channel width {width} is not divisible by norm_groups={self.norm_groups}")
        if self.attention_norm_groups is not None and self.attention_norm_groups < 1:
            raise ValueError(f"attention_norm_groups must be >= 1, got {self.attention_norm_groups}")
        attended = [self.channels[stage] for stage in self.attention_stages]
        if self.mid_attention:
            attended.append(self.channels[-1])
        for width in attended:
            if width % self.attention_heads:
                raise ValueError(f"attention width {width} is not divisible by attention_heads={self.attention_heads}")
            if width % self.attention_groups:
                raise ValueError(
                    f"attention width {width} is not divisible by attention_norm_groups={self.attention_groups}"
                )
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        if self.temporal and any(width % self.attention_heads for width in self.channels):
            raise ValueError(
                f"a temporal level attends over frames at every stage: every channel width "
                f"{self.channels} must be divisible by attention_heads={self.attention_heads}"
            )

    @property
    def attention_groups(self) -> int:
        """GroupNorm groups in this level's attention layers."""
        return self.norm_groups if self.attention_norm_groups is None else self.attention_norm_groups

    @property
    def downsampling(self) -> int:
        """Side ratio between this level's input and its bottleneck."""
        return self.patch_size * 2 ** (len(self.channels) - 1)

    def stage_attention_layers(self, stage: int) -> int:
        return self.attention_layers[stage] if stage in self.attention_stages else 0


@dataclass
class ModelConfig:
    levels: list[LevelConfig] = field(default_factory=lambda: [LevelConfig()])
    """UNets from the innermost (base resolution) outward; one entry is a plain UNet."""
    in_channels: int = 3
    out_channels: int = 3
    time_embed_dim: int | None = None
    """Width of the time embedding shared by all levels (default: 4 x innermost first width)."""
    num_classes: int = 0
    """Class-conditional model when > 0 (embedding added to the time embedding, plus a null class)."""
    text_dim: int = 0
    """Width of the frozen text encoder's tokens; 0 disables text conditioning."""
    text_proj_dim: int = 0
    """If > 0, a linear ``lm_proj`` maps tokens to this width before cross-attention (ml-mdm)."""
    text_attention_mask: bool = True
    """Honour the padding mask in cross-attention (ml-mdm's released 64² model does not)."""
    gradient_checkpointing: bool = False
    self_condition: bool = False
    """Every level also takes an x0 estimate of its own level as ``in_channels`` more input channels
    (self-conditioning, Chen et al. 2023, "Analog Bits", §3): the sampler's previous estimate, zeros
    when there is none; training feeds it (``MatryoshkaDiffusion.loss``) for half of the samples."""
    frames: list[int] = field(default_factory=list)
    """Video: frames of each level, innermost first like ``levels`` (each a multiple of the one
    inside it; the innermost may be 1, an image model inside the video model); empty: images."""
    magnitude_preserving: bool = False
    """EDM2's magnitude-preserving layers (``mp_layers.py``) instead of GroupNorm UNet blocks: they want a
    learning rate ~40x higher (``emoji64``: 4e-2). Not convertible to ml-mdm's layout; under FSDP the in-place
    re-normalisation of the weights may not reach the shards (the forward normalises them anyway)."""

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError("levels must contain at least one UNet level")
        if not 1 <= len(self.levels) <= 4:
            raise ValueError(f"between 1 and 4 nested levels are supported, got {len(self.levels)}")
        if self.num_classes < 0 or self.text_dim < 0 or self.text_proj_dim < 0:
            raise ValueError("num_classes, text_dim and text_proj_dim must be >= 0")
        if self.frames:
            if len(self.frames) != len(self.levels):
                raise ValueError(f"frames needs one count per level (innermost first), got {self.frames}")
            if any(f < 1 for f in self.frames) or any(o % i for i, o in zip(self.frames, self.frames[1:])):
                raise ValueError(f"frames must be >= 1, each a multiple of the level inside it; got {self.frames}")
        elif any(level.temporal or level.frame_embedding for level in self.levels):
            raise ValueError(
                "a temporal level or frame_embedding needs model.frames (one frame count per level, innermost first)"
            )
        if self.magnitude_preserving and (
            self.text_dim or self.frames or any(level.micro_conditioning for level in self.levels)
        ):
            raise ValueError("magnitude_preserving supports unconditional and class-conditional image models only")
        if self.magnitude_preserving and any(level.attention_ffn for level in self.levels):
            raise ValueError("magnitude_preserving blocks have no attention feed-forward: set attention_ffn=false")
        if any(level.patch_size != 1 for level in self.levels[:-1]):
            raise ValueError(
                "only the outermost level may have patch_size > 1: a level inside another takes the outer "
                "level's bottleneck features at its full side"
            )
        ratios = {level.downsampling for level in self.levels[1:]}
        if len(ratios) > 1:
            raise ValueError(
                "every outer level must downsample by the same factor (its number of stages sets "
                f"the nesting ratio); got ratios {sorted(ratios)}"
            )

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def is_video(self) -> bool:
        return bool(self.frames)

    @property
    def nest_ratio(self) -> int:
        """Side ratio between adjacent levels (1 for a plain UNet)."""
        return self.levels[-1].downsampling if self.num_levels > 1 else 1

    @property
    def embed_dim(self) -> int:
        return self.time_embed_dim or 4 * self.levels[0].channels[0]

    @property
    def cross_attention_dim(self) -> int:
        return self.text_proj_dim or self.text_dim

    def level_sides(self, resolution: int) -> list[int]:
        """Sides of every level for a top resolution, highest first."""
        return [resolution // self.nest_ratio**i for i in range(self.num_levels)]

    def truncated(self, num_levels: int) -> ModelConfig:
        """The same model with only its innermost ``num_levels`` levels (progressive training)."""
        from dataclasses import replace

        return replace(self, levels=list(self.levels[:num_levels]), frames=list(self.frames[:num_levels]))
