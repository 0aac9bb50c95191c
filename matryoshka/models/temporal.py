"""Temporal layers of a factorised space-time UNet level (video).

Spatial layers see a clip as a batch of frames: (B, C, F, H, W) is folded to (B*F, C, H, W),
so an image model's convolutions and attention run per frame unchanged. After each ResNet
block of a temporal level, a temporal convolution and a temporal self-attention mix the
frames at every pixel (the factorised space-time design of Ho et al. 2022, "Video Diffusion
Models", used by MDM's video model, paper §4.3). Both end in a zero-initialised projection
added to their input, so a freshly added temporal layer is exactly the identity: a video
model inflated from an image model starts as that image model applied to every frame.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import zero_init


def fold_frames(clips: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B*F, C, H, W), frames of a sample adjacent."""
    batch, channels, frames, height, width = clips.shape
    return clips.transpose(1, 2).reshape(batch * frames, channels, height, width)


def unfold_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B*F, C, H, W) -> (B, C, F, H, W)."""
    total, channels, height, width = x.shape
    return x.reshape(total // frames, frames, channels, height, width).transpose(1, 2)


def frame_positions(frames: int, channels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(F, C) sinusoidal encoding of the frame index (Vaswani et al. 2017), [sin | cos] halves."""
    half = channels // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) / half)
    angles = torch.arange(frames, device=device, dtype=torch.float32)[:, None] * frequencies[None]
    encoding = torch.cat([angles.sin(), angles.cos(), angles.new_zeros(frames, channels - 2 * half)], dim=1)
    return encoding.to(dtype)


class TemporalConv(nn.Module):
    """GN -> SiLU -> convolution over frames (kernel 3, per pixel) -> zero-initialised, plus the input."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        # A (3, 1) Conv2d over (B, C, F, H*W): a 1-D convolution over frames at each pixel, with
        # 4-D weights that the channels-last layout of the rest of the model accepts.
        self.conv = zero_init(nn.Conv2d(channels, channels, (3, 1), padding=(1, 0)))

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        clips = unfold_frames(x, frames)
        batch, channels, _, height, width = clips.shape
        h = F.silu(self.norm(clips)).reshape(batch, channels, frames, height * width)
        return x + fold_frames(self.conv(h).reshape(batch, channels, frames, height, width))


class TemporalAttention(nn.Module):
    """Self-attention over the frames at each pixel, with a frame-position encoding; zero-init output."""

    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = zero_init(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        total, channels, height, width = x.shape
        batch, pixels = total // frames, height * width
        # (B*F, C, H, W) -> (B*H*W, F, C): one sequence of frames per pixel.
        seq = self.norm(x).reshape(batch, frames, channels, pixels).permute(0, 3, 1, 2)
        seq = seq.reshape(batch * pixels, frames, channels)
        seq = seq + frame_positions(frames, channels, x.device, seq.dtype)
        q, k, v = self.qkv(seq).reshape(batch * pixels, frames, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch * pixels, frames, channels)
        out = self.proj_out(out).reshape(batch, pixels, frames, channels).permute(0, 2, 3, 1)
        return x + out.reshape(total, channels, height, width)


class TemporalBlock(nn.Module):
    """Temporal convolution then temporal attention; the identity for one-frame clips (images)."""

    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        self.conv = TemporalConv(channels, groups)
        self.attn = TemporalAttention(channels, heads, groups)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        if frames == 1:
            return x
        return self.attn(self.conv(x, frames), frames)


def frame_places(frames: int, device: torch.device) -> torch.Tensor:
    """(F,) each frame's place in its clip, index / F scaled to the time embedding's 0-1000 range.

    Index / F (not / (F-1)) is the same for a frame at every level of the space-time pyramid:
    inner frame k, kept from every s-th frame, is outer frame k*s of s*F frames.
    """
    return torch.arange(frames, device=device, dtype=torch.float32) * (1000.0 / frames)


def is_temporal_parameter(name: str) -> bool:
    """Parameters an image model lacks: they keep their identity initialisation when inflating."""
    dotted = f".{name}"
    return ".temporal." in dotted or ".frame_emb." in dotted
