"""Magnitude-preserving layers (EDM2: Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", §2-3), for ``ModelConfig.magnitude_preserving``.

Every layer keeps unit-variance activations at unit variance: convolution weights are normalised
to unit norm per output channel, re-normalised in place at each training step ("forced weight
normalisation", so Adam's steps change their direction, not their size), and scaled by
1/sqrt(fan-in); additions and concatenations are weighted so their sum keeps unit variance;
SiLU is divided by its output's standard deviation under a unit Gaussian. No GroupNorm, no biases.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SILU_STD = 0.596
"""Standard deviation of SiLU(x) for x ~ N(0, 1)."""


def normalize(x: torch.Tensor, dim: int | list[int] | None = None, eps: float = 1e-4) -> torch.Tensor:
    """``x`` scaled to unit root-mean-square over ``dim`` (all but the first by default)."""
    dims = list(range(1, x.dim())) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32)
    norm = eps + norm * math.sqrt(norm.numel() / x.numel())
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) / SILU_STD


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """(1 - t) a + t b, rescaled to unit variance for independent unit-variance a and b."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Channel concatenation where a and b contribute (1 - t) : t of the output's energy."""
    na, nb = a.shape[1], b.shape[1]
    scale = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (scale * (1 - t) / math.sqrt(na)), b * (scale * t / math.sqrt(nb))], dim=1)


class MPConv(nn.Module):
    """A bias-free convolution (or linear layer, ``kernel=0``) with normalised weights.

    ``zero_gain``: the output is scaled by a learned gain that starts at 0, so a layer that ends a
    branch starts as the identity of what it is added to (EDM2's output and embedding gains).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, zero_gain: bool = False) -> None:
        super().__init__()
        shape = (out_ch, in_ch, kernel, kernel) if kernel else (out_ch, in_ch)
        self.weight = nn.Parameter(torch.randn(shape))
        self.gain = nn.Parameter(torch.zeros([])) if zero_gain else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gain = 1.0 if self.gain is None else self.gain
        w = self.weight.float()
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.dim() == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class MPFourier(nn.Module):
    """Random Fourier features of a scalar with unit variance (EDM2's noise-level embedding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("frequencies", 2 * math.pi * torch.randn(channels, generator=generator))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=generator))

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return (torch.outer(value.float(), self.frequencies) + self.phases).cos() * math.sqrt(2)


class MPTimeEmbedding(nn.Module):
    """Fourier features of the model time, then one normalised linear layer.

    The model time [0, 1000] is scaled to [0, 1], a range of the order of EDM2's input, ln(sigma)/4
    (about -1.5 to 1.1).
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.fourier = MPFourier(embed_dim)
        self.linear = MPConv(embed_dim, embed_dim, 0)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear(self.fourier(t / 1000.0))


class MPResNet(nn.Module):
    """EDM2's block: conv -> x (1 + embedding) -> conv, added to the input with weight 0.3.

    ``encoder`` blocks project and pixel-normalise their input before the residual branch (their
    inputs are unnormalised sums); decoder blocks take a concatenated skip and project it after.
    """

    def __init__(self, in_ch: int, out_ch: int, embed_dim: int, encoder: bool, dropout: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.conv_skip = MPConv(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.conv_res0 = MPConv(out_ch if encoder else in_ch, out_ch, 3)
        self.emb_linear = MPConv(embed_dim, out_ch, 0, zero_gain=True)
        self.dropout = nn.Dropout(dropout)
        self.conv_res1 = MPConv(out_ch, out_ch, 3)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.encoder:
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)
        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb) + 1
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        y = self.conv_res1(self.dropout(y))
        if not self.encoder and self.conv_skip is not None:
            x = self.conv_skip(x)
        return mp_sum(x, y, 0.3).clamp(-256, 256)


class MPAttention(nn.Module):
    """Self-attention on pixel-normalised queries, keys and values, added with weight 0.3."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = MPConv(channels, 3 * channels, 1)
        self.proj_out = MPConv(channels, channels, 1)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        batch, channels, height, width = x.shape
        qkv = self.qkv(x).reshape(batch, self.heads, channels // self.heads, 3, height * width)
        q, k, v = normalize(qkv, dim=2).unbind(3)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        y = self.proj_out(h.transpose(-1, -2).reshape(batch, channels, height, width))
        return mp_sum(x, y, 0.3).clamp(-256, 256)
