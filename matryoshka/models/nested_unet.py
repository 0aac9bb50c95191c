"""The NestedUNet (paper §3.2, SPEC §4): the UNet of each resolution sits inside the next.

The module is the outermost level; ``inner_unet`` holds the next level down, recursively,
so a model with one level is a plain UNet and parameter names match ml-mdm's checkpoints.
The innermost level owns the conditioning (text projection, pooled text and class
embeddings) and the mid blocks; outer levels reuse its conditioning embedding.

Video (``config.frames``): every level takes clips (B, C, F, H, W) and runs its spatial layers
per frame (frames folded into the batch); temporal levels add ``temporal.py``'s layers. Between
levels the adapters follow the space-time pyramid: the in_adapter's features go to the inner
level's frames (every k-th frame, as the data), the inner features come back repeated k times.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from .conditioning import Conditioning
from .config import LevelConfig, ModelConfig
from .layers import SinusoidalEmbedding, Stage, zero_init
from .mp_layers import MPConv, MPTimeEmbedding, mp_silu, mp_sum
from .temporal import fold_frames, frame_places, unfold_frames


@dataclass
class _Context:
    """Conditioning computed once by the innermost level and shared by all levels."""

    embedding: torch.Tensor | None
    tokens: torch.Tensor | None
    mask: torch.Tensor | None
    micro: dict[str, torch.Tensor]

    def repeated(self, frames: int) -> _Context:
        """Every sample's conditioning repeated for each of its frames (frames folded into the batch)."""

        def repeat(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else value.repeat_interleave(frames, dim=0)

        micro = {key: repeat(value) for key, value in self.micro.items()}
        return _Context(repeat(self.embedding), repeat(self.tokens), repeat(self.mask), micro)


class NestedUNet(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        level: LevelConfig = config.levels[-1]
        self.level = level
        self.is_innermost = config.num_levels == 1
        embed_dim = config.embed_dim
        cond_dim = config.cross_attention_dim
        mp = config.magnitude_preserving

        self.temb = MPTimeEmbedding(embed_dim) if mp else SinusoidalEmbedding(embed_dim)
        self.cond_layers = nn.ModuleDict(
            {key: SinusoidalEmbedding(embed_dim, zero_output=True) for key in level.micro_conditioning}
        )
        self.frame_emb = SinusoidalEmbedding(embed_dim, zero_output=True) if level.frame_embedding else None
        if self.is_innermost:
            self.lm_proj = (
                nn.Linear(config.text_dim, config.text_proj_dim) if config.text_dim and config.text_proj_dim else None
            )
            self.cond_emb = nn.Linear(cond_dim, embed_dim, bias=False) if config.text_dim else None
            # Index num_classes is the learned null class used for guidance.
            if not config.num_classes:
                self.class_emb = None
            elif mp:  # one-hot labels scaled to unit root-mean-square: each class a unit-variance embedding
                self.class_emb = MPConv(config.num_classes + 1, embed_dim, 0)
            else:
                self.class_emb = nn.Embedding(config.num_classes + 1, embed_dim)

        stage_options = dict(
            heads=level.attention_heads,
            groups=level.norm_groups,
            attention_groups=level.attention_groups,
            dropout=level.dropout,
            cond_dim=cond_dim,
            ffn=level.attention_ffn,
            checkpointing=config.gradient_checkpointing,
            temporal=level.temporal,
            magnitude_preserving=mp,
        )
        width = level.channels[0]
        patch_area = level.patch_size**2
        inputs = config.in_channels * (2 if config.self_condition else 1) * patch_area
        # EDM2 appends a constant channel: the bias-free first convolution then still sees the border.
        self.conv_in = MPConv(inputs + 1, width, 3) if mp else nn.Conv2d(inputs, width, 3, padding=1)
        skip_widths = [width]
        self.down_blocks = nn.ModuleList()
        last_stage = len(level.channels) - 1
        for stage, out_ch in enumerate(level.channels):
            inputs = [width] + [out_ch] * (level.res_blocks[stage] - 1)
            resample = "down" if stage != last_stage else None
            self.down_blocks.append(
                Stage(
                    inputs,
                    out_ch,
                    embed_dim,
                    level.stage_attention_layers(stage),
                    resample,
                    encoder=True,
                    **stage_options,
                )
            )
            skip_widths += [out_ch] * (level.res_blocks[stage] + (resample is not None))
            width = out_ch

        if self.is_innermost:
            self.mid_blocks = nn.ModuleList(
                [
                    Stage([width], width, embed_dim, int(level.mid_attention), None, **stage_options),
                    Stage([width], width, embed_dim, 0, None, **stage_options),
                ]
            )
            self.inner_unet = None
        else:
            self.inner_unet = NestedUNet(config.truncated(config.num_levels - 1))
            inner_width = config.levels[-2].channels[0]
            if mp:
                self.in_adapter = MPConv(width, inner_width, 3, zero_gain=True)
                self.out_adapter = MPConv(inner_width, width, 3, zero_gain=True)
            else:
                self.in_adapter = zero_init(nn.Conv2d(width, inner_width, 3, padding=1))
                self.out_adapter = zero_init(nn.Conv2d(inner_width, width, 3, padding=1))

        self.up_blocks = nn.ModuleList()
        for stage in reversed(range(len(level.channels))):
            out_ch = level.channels[stage]
            inputs = []
            for _ in range(level.res_blocks[stage] + 1):
                inputs.append(width + skip_widths.pop())
                width = out_ch
            resample = "up" if stage != 0 else None
            self.up_blocks.append(
                Stage(inputs, out_ch, embed_dim, level.stage_attention_layers(stage), resample, **stage_options)
            )
        if mp:
            self.norm_out = None
            self.conv_out = MPConv(width, config.out_channels * patch_area, 3, zero_gain=True)
        else:
            self.norm_out = nn.GroupNorm(level.norm_groups, width)
            self.conv_out = zero_init(nn.Conv2d(width, config.out_channels * patch_area, 3, padding=1))

    # ------------------------------------------------------------------ conditioning
    @property
    def innermost(self) -> NestedUNet:
        return self if self.inner_unet is None else self.inner_unet.innermost

    def _context(self, cond: Conditioning | None, batch: int, device: torch.device) -> _Context:
        """Pooled conditioning embedding and cross-attention tokens (innermost level's job)."""
        config = self.config
        cond = cond or Conditioning()
        embedding = tokens = mask = None
        if config.text_dim:
            if cond.text is None:
                raise ValueError("this model is text-conditional: the conditioning has no text tokens")
            tokens, mask = cond.text, cond.text_mask
            if self.lm_proj is not None:
                tokens = self.lm_proj(tokens)
            weights = mask.to(tokens.dtype).unsqueeze(-1)
            pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            embedding = self.cond_emb(pooled)
            if not config.text_attention_mask:
                mask = None
        if config.num_classes:
            labels = cond.labels
            if labels is None:
                labels = torch.full((batch,), -1, dtype=torch.long, device=device)
            if labels.max() >= config.num_classes:
                raise ValueError(f"class label {int(labels.max())} out of range for {config.num_classes} classes")
            labels = torch.where(labels < 0, torch.full_like(labels, config.num_classes), labels)
            if config.magnitude_preserving:
                one_hot = F.one_hot(labels, config.num_classes + 1).float()
                class_embedding = self.class_emb(one_hot * (config.num_classes + 1) ** 0.5)
            else:
                class_embedding = self.class_emb(labels)
            embedding = class_embedding if embedding is None else embedding + class_embedding
        return _Context(embedding, tokens, mask, cond.micro)

    def _time_embedding(self, t: torch.Tensor, context: _Context) -> torch.Tensor:
        emb = self.temb(t)
        if self.config.magnitude_preserving:
            if context.embedding is not None:
                emb = mp_sum(emb, context.embedding.to(emb.dtype), 0.5)
            # The blocks' embedding layers take it activated (a standard block applies SiLU itself).
            return mp_silu(emb)
        if context.embedding is not None:
            emb = emb + context.embedding
        for key, layer in self.cond_layers.items():
            default = self.level.micro_conditioning[key]
            value = context.micro.get(key)
            value = torch.full_like(t, default, dtype=torch.float32) if value is None else value.float()
            # ml-mdm: the resolution "scale" saturates at the level's default; others are scaled by 1000.
            value = value.clamp(max=default) if key == "scale" else value * 1000.0
            emb = emb + layer(value)
        return emb

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        z: list[torch.Tensor] | torch.Tensor,
        t: torch.Tensor,
        cond: Conditioning | None = None,
        self_cond: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Denoise a pyramid.

        z: noisy levels, highest resolution first (a single tensor for a one-level model).
        The top level may hold only the first k samples of the batch (mixed-resolution
        training); every other level holds the full batch B. t: (B,) model times.
        self_cond: a self-conditioning model's x0 estimates, shaped like z (None: zeros).
        Returns predictions for all levels, highest first, with z's batch sizes.
        """
        levels = [z] if torch.is_tensor(z) else list(z)
        if len(levels) != self.config.num_levels:
            raise ValueError(f"model has {self.config.num_levels} levels but got {len(levels)} inputs")
        levels = self._with_self_condition(levels, self_cond)
        batch = levels[-1].shape[0]
        self._check_frames(levels)
        if t.dim() == 0:
            t = t.expand(batch)
        context = self.innermost._context(cond, batch, levels[-1].device)
        outputs, _ = self._denoise(levels, t, context, None)
        return outputs

    def _with_self_condition(
        self, levels: list[torch.Tensor], self_cond: list[torch.Tensor] | None
    ) -> list[torch.Tensor]:
        """Each level with its x0 estimate appended along the channels (zeros when there is none)."""
        if not self.config.self_condition:
            if self_cond is not None:
                raise ValueError("this model is not self-conditioning (model.self_condition=false): got self_cond")
            return levels
        if self_cond is None:
            return [torch.cat([z, torch.zeros_like(z)], dim=1) for z in levels]
        if len(self_cond) != len(levels) or any(e.shape != z.shape for e, z in zip(self_cond, levels)):
            raise ValueError(
                f"self_cond must match the noisy levels' shapes {[tuple(z.shape) for z in levels]}, "
                f"got {[tuple(e.shape) for e in self_cond]}"
            )
        return [torch.cat([z, e.to(z.dtype)], dim=1) for z, e in zip(levels, self_cond)]

    def _check_frames(self, levels: list[torch.Tensor]) -> None:
        """Clips at every level of a video model (any frame counts nested like ``config.frames``)."""
        if not self.config.is_video:
            return
        if any(level.dim() != 5 for level in levels):
            shapes = [tuple(x.shape) for x in levels]
            raise ValueError(f"a video model takes clips (B, C, F, H, W) at every level, got {shapes}")
        frames = [level.shape[2] for level in levels]
        if any(outer % inner for outer, inner in pairwise(frames)):
            raise ValueError(f"each level's frames must be a multiple of the next lower level's, got {frames}")

    def _denoise(
        self, levels: list[torch.Tensor], t: torch.Tensor, context: _Context, features: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        top = levels[0]
        k = top.shape[0]  # samples whose top level is computed
        video = top.dim() == 5
        frames = top.shape[2] if video else 1
        level_t, level_context = t, context
        if video:
            # Spatial layers run per frame, each frame with its sample's time and conditioning:
            # computed on the folded batch, so an inflated model is exactly the image model per frame.
            top = fold_frames(top)
            level_t, level_context = t.repeat_interleave(frames), context.repeated(frames)
        rows = k * frames
        emb = self._time_embedding(level_t, level_context)[:rows]
        if self.frame_emb is not None and frames > 1:  # frames of a sample are adjacent rows
            emb = emb + self.frame_emb(frame_places(frames, emb.device)).repeat(k, 1)
        tokens = None if level_context.tokens is None else level_context.tokens[:rows]
        mask = None if level_context.mask is None else level_context.mask[:rows]

        if self.level.normalize_input:  # per image, so per frame for clips, by the noisy channels' std
            std = top[:, : self.config.in_channels].flatten(1).std(dim=1)
            top = top / std.reshape(-1, *([1] * (top.dim() - 1)))
        if self.level.patch_size > 1:
            top = F.pixel_unshuffle(top, self.level.patch_size)
        if self.config.magnitude_preserving:
            top = torch.cat([top, torch.ones_like(top[:, :1])], dim=1)
        x = self.conv_in(top)
        if features is not None:
            x = x + features

        skips = [x]
        for block in self.down_blocks:
            x, activations = block(x, emb, tokens, mask, frames=frames)
            skips += activations

        if self.inner_unet is None:
            lower: list[torch.Tensor] = []
            x, _ = self.mid_blocks[0](x, emb, tokens, mask, frames=frames)
            x, _ = self.mid_blocks[1](x, emb, frames=frames)
        else:
            inner_features = self.in_adapter(x)
            inner_frames = levels[1].shape[2] if video else 1
            stride = frames // inner_frames
            if video:  # the inner level sees every stride-th frame, as its data (spacetime.downsample)
                inner_features = fold_frames(unfold_frames(inner_features, frames)[:, :, ::stride])
            full = levels[1].shape[0]
            if full > k:  # the rest of the batch has no top level: its adapter input is zero
                padding = inner_features.new_zeros((full - k) * inner_frames, *inner_features.shape[1:])
                inner_features = torch.cat([inner_features, padding])
            lower, inner_out = self.inner_unet._denoise(levels[1:], t, context, inner_features)
            adapted = self.out_adapter(inner_out)
            if video:  # each inner frame stands for the stride frames it was taken from
                adapted = fold_frames(unfold_frames(adapted, inner_frames)[:k].repeat_interleave(stride, dim=2))
            else:
                adapted = adapted[:k]
            x = x + adapted

        for block in self.up_blocks:
            count = len(block.resnets)
            x, _ = block(x, emb, tokens, mask, skips=skips[-count:], frames=frames)
            del skips[-count:]

        out = self.conv_out(x if self.norm_out is None else F.silu(self.norm_out(x)))
        if self.level.patch_size > 1:
            out = F.pixel_shuffle(out, self.level.patch_size)
        return [unfold_frames(out, frames) if video else out, *lower], x
