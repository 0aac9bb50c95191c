"""Magnitude-preserving layers (EDM2: Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", §2-3), for ``ModelConfig.magnitude_preserving``.

Every layer keeps unit-variance activations at unit variance: convolution weights are normalised
to unit norm per output channel, re-normalised in place at each training step ("forced weight
normalisation", so Adam's steps change their direction, not their size), and scaled by
1/sqrt(fan-in); additions and concatenations are weighted so their sum keeps unit variance;
SiLU is divided by its output's standard deviation under a unit Gaussian. No GroupNorm, no biases,
and no clipping of block outputs (EDM2's guards float16, which this project does not train in).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SILU_STD = 0.596
"""Standard deviation of SiLU(x) for x ~ N(0, 1)."""
NORM_EPS = 1e-4
"""Added to a norm before dividing by it (EDM2's)."""


def norm(x: torch.Tensor, dim: int | list[int] | None = None) -> torch.Tensor:
    """The L2 norm over ``dim`` (all but the first by default), kept for broadcasting, in at least float32."""
    dims = list(range(1, x.dim())) if dim is None else dim
    return torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))


def normalize(x: torch.Tensor, dim: int | list[int] | None = None, eps: float = NORM_EPS) -> torch.Tensor:
    """``x`` scaled to unit root-mean-square over ``dim`` (all but the first by default)."""
    length = norm(x, dim)
    length = eps + length * math.sqrt(length.numel() / x.numel())
    return x / length.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) / SILU_STD


def mp_sum_weights(t: float) -> tuple[float, float]:
    """The weights of a and b in ``mp_sum(a, b, t)``; a layer that makes b takes its weight into its own."""
    total = math.sqrt((1 - t) ** 2 + t**2)
    return (1 - t) / total, t / total


SKIP_WEIGHT, BRANCH_WEIGHT = mp_sum_weights(0.3)
"""A residual block's output: mp_sum(input, branch, 0.3), EDM2's residual balance."""


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """(1 - t) a + t b, rescaled to unit variance for independent unit-variance a and b."""
    wa, wb = mp_sum_weights(t)
    return torch.add(a * wa, b, alpha=wb)


def mp_cat(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Channel concatenation where a and b contribute (1 - t) : t of the output's energy."""
    na, nb = a.shape[1], b.shape[1]
    scale = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (scale * (1 - t) / math.sqrt(na)), b * (scale * t / math.sqrt(nb))], dim=1)


class _Normalised(torch.autograd.Function):
    """normalize(w) * scale and its exact gradient, given w's row norms (the forced normalisation knows them).

    Autograd through ``normalize`` twice (once to force, once for the gradient) read every weight many
    times per step, a visible share of a CPU step; here it is one pass forward and four backward
    (docs/benchmarks.md, twenty-second round).
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, length: torch.Tensor, scale: float) -> torch.Tensor:
        fan_in = weight[0].numel()
        denominator = NORM_EPS + length / math.sqrt(fan_in)
        ctx.save_for_backward(weight, length, denominator)
        ctx.scale = scale
        return weight * (scale / denominator)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        weight, length, denominator = ctx.saved_tensors
        fan_in = weight[0].numel()
        # d(w/n)/dw for n = eps + |w|/sqrt(fan_in): the gradient over n, less its component along w.
        dims = list(range(1, weight.dim()))
        # (A zero row has no direction to remove: its length is clamped to keep 0/0 out.)
        radial = denominator * length.clamp_min(1e-30) * math.sqrt(fan_in)
        along = (grad * weight).sum(dim=dims, keepdim=True) / radial
        return (grad - weight * along) * (ctx.scale / denominator), None, None


class MPConv(nn.Module):
    """A bias-free convolution (or linear layer, ``kernel=0``) with normalised weights.

    ``zero_gain``: the output is scaled by a learned gain that starts at 0, so a layer that ends a
    branch starts as the identity of what it is added to (EDM2's output and embedding gains).
    ``forward``'s ``scale`` multiplies the output: a constant that follows a linear layer (the
    weight of a magnitude-preserving sum, SiLU's 1/0.596) costs nothing on its weights.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, zero_gain: bool = False) -> None:
        super().__init__()
        shape = (out_ch, in_ch, kernel, kernel) if kernel else (out_ch, in_ch)
        self.weight = nn.Parameter(torch.randn(shape))
        self.gain = nn.Parameter(torch.zeros([])) if zero_gain else None

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        root_fan_in = math.sqrt(self.weight[0].numel())
        scale /= root_fan_in
        if self.training:
            with torch.no_grad():
                # Forced weight normalisation, then the norm of the weights it leaves, in closed form.
                length = norm(self.weight)
                denominator = NORM_EPS + length / root_fan_in
                self.weight.div_(denominator)
                length = length / denominator
            w = _Normalised.apply(self.weight, length, scale)
        else:
            w = normalize(self.weight) * scale
        if self.gain is not None:
            w = w * self.gain
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
        # SiLU's 1/0.596 and the branch's weight in the sum are folded into the convolutions after them.
        y = self.conv_res0(F.silu(x), scale=1 / SILU_STD)
        scale = self.emb_linear(emb) + 1
        y = F.silu(y * scale[:, :, None, None].to(y.dtype))
        y = self.conv_res1(self.dropout(y), scale=BRANCH_WEIGHT / SILU_STD)
        if not self.encoder and self.conv_skip is not None:
            x = self.conv_skip(x)
        return torch.add(y, x, alpha=SKIP_WEIGHT)


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
        y = self.proj_out(h.transpose(-1, -2).reshape(batch, channels, height, width), scale=BRANCH_WEIGHT)
        return torch.add(y, x, alpha=SKIP_WEIGHT)
