"""Building blocks of one UNet level (SPEC §4), written for N spatial dimensions.

Module and parameter names follow ml-mdm's (``resnets``, ``attn``, ``qkv``, ``kv_cond``,
``time_layer``...) so that its released checkpoints map onto ours tensor for tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .mp_layers import MPAttention, MPResNet, mp_cat


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer that ends a residual branch, so the branch starts as the identity."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class SinusoidalEmbedding(nn.Module):
    """[sin, cos] features of a scalar (ADM convention) followed by Linear -> SiLU -> Linear.

    ``layer1``/``layer2`` are exposed so ml-mdm's ``temb_layer1/2`` and micro-conditioning
    ``cond_layers.<key>.0/1`` map onto them.
    """

    def __init__(self, embed_dim: int, zero_output: bool = False) -> None:
        super().__init__()
        half = embed_dim // 8
        frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("frequencies", frequencies, persistent=False)
        self.layer1 = nn.Linear(2 * half, embed_dim)
        self.layer2 = nn.Linear(embed_dim, embed_dim)
        if zero_output:
            zero_init(self.layer2)

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        angles = value.float()[:, None] * self.frequencies[None]
        features = torch.cat([angles.sin(), angles.cos()], dim=1).to(self.layer1.weight.dtype)
        return self.layer2(F.silu(self.layer1(features)))


class ResNet(nn.Module):
    """GN -> SiLU -> conv -> GN * (1 + scale) + shift -> SiLU -> dropout -> zero conv, plus skip."""

    def __init__(self, in_ch: int, out_ch: int, embed_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_layer = nn.Linear(embed_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.conv3 = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time_layer(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        h = self.conv2(self.dropout(h))
        return h + (x if self.conv3 is None else self.conv3(x))


class Attention(nn.Module):
    """Multi-head self-attention over all positions, plus optional cross-attention to text.

    As in ml-mdm the cross-attention reuses the self-attention queries and the two outputs
    are summed before one zero-initialised projection. Head h owns channels
    [h*C/heads, (h+1)*C/heads) of q, k and v.
    """

    def __init__(self, channels: int, heads: int, groups: int, cond_dim: int, ffn: bool) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        if cond_dim > 0:
            self.norm_cond = nn.LayerNorm(cond_dim)
            self.kv_cond = nn.Linear(cond_dim, 2 * channels)
        else:
            self.norm_cond = self.kv_cond = None
        self.proj_out = zero_init(nn.Conv2d(channels, channels, 1))
        self.ffn = (
            nn.Sequential(
                nn.GroupNorm(groups, channels),
                nn.Conv2d(channels, 4 * channels, 1),
                nn.GELU(),
                zero_init(nn.Conv2d(4 * channels, channels, 1)),
            )
            if ffn
            else None
        )

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, N) -> (B, heads, N, C/heads)."""
        batch, channels, length = x.shape
        return x.reshape(batch, self.heads, channels // self.heads, length).transpose(-1, -2)

    def forward(
        self, x: torch.Tensor, tokens: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(batch, 3 * channels, -1).chunk(3, dim=1)
        q = self._split_heads(q)
        h = F.scaled_dot_product_attention(q, self._split_heads(k), self._split_heads(v))
        if self.kv_cond is not None:
            if tokens is None:
                raise ValueError("this model cross-attends to text: pass text tokens in the conditioning")
            k_text, v_text = self.kv_cond(self.norm_cond(tokens)).transpose(1, 2).chunk(2, dim=1)
            h = h + self._cross_attention(q, self._split_heads(k_text), self._split_heads(v_text), mask)
        h = h.transpose(-1, -2).reshape(batch, channels, *spatial)
        x = x + self.proj_out(h)
        if self.ffn is not None:
            x = x + self.ffn(x)
        return x

    @staticmethod
    def _cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v)
        # A sample whose mask is all False is the null text condition: it attends to
        # nothing and contributes zero (softmax over an empty set would be NaN).
        has_tokens = mask.any(dim=1)
        safe_mask = mask | ~has_tokens[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe_mask[:, None, None, :])
        return out * has_tokens.to(out.dtype)[:, None, None, None]


class Stage(nn.Module):
    """ResNet blocks (each optionally followed by attention layers) and an optional resample.

    On the way up every ResNet block first concatenates one skip activation. In a temporal
    (video) stage each block ends with a ``TemporalBlock`` over the ``frames`` folded into the batch.
    """

    def __init__(
        self,
        in_channels: list[int],
        out_ch: int,
        embed_dim: int,
        attention_layers: int,
        resample: str | None,
        *,
        heads: int,
        groups: int,
        attention_groups: int,
        dropout: float,
        cond_dim: int,
        ffn: bool,
        checkpointing: bool = False,
        temporal: bool = False,
        magnitude_preserving: bool = False,
        encoder: bool = False,
    ) -> None:
        from .temporal import TemporalBlock

        super().__init__()
        self.checkpointing = checkpointing
        self.magnitude_preserving = magnitude_preserving
        if magnitude_preserving:
            self.resnets = nn.ModuleList(MPResNet(c, out_ch, embed_dim, encoder, dropout) for c in in_channels)
        else:
            self.resnets = nn.ModuleList(ResNet(c, out_ch, embed_dim, groups, dropout) for c in in_channels)
        self.attention_layers = attention_layers
        self.attn = (
            nn.ModuleList(
                MPAttention(out_ch, heads)
                if magnitude_preserving
                else Attention(out_ch, heads, attention_groups, cond_dim, ffn)
                for _ in range(len(in_channels) * attention_layers)
            )
            if attention_layers
            else None
        )
        self.temporal = nn.ModuleList(TemporalBlock(out_ch, heads, groups) for _ in in_channels) if temporal else None
        self.resample_mode = resample
        stride = 2 if resample == "down" else 1
        # EDM2 resamples without a convolution (average pooling, nearest upsampling).
        with_conv = resample is not None and not magnitude_preserving
        self.resample = nn.Conv2d(out_ch, out_ch, 3, stride=stride, padding=1) if with_conv else None

    def _run(self, module: nn.Module, *args):
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        tokens: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        skips: list[torch.Tensor] | None = None,
        frames: int = 1,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns the output and the activations to keep as skip connections."""
        activations = []
        for index, resnet in enumerate(self.resnets):
            if skips is not None:
                skip = skips.pop()
                x = mp_cat(x, skip) if self.magnitude_preserving else torch.cat([x, skip], dim=1)
            x = self._run(resnet, x, emb)
            for layer in range(self.attention_layers):
                x = self._run(self.attn[index * self.attention_layers + layer], x, tokens, mask)
            if self.temporal is not None and frames > 1:
                x = self._run(self.temporal[index], x, frames)
            activations.append(x)
        if self.resample_mode == "up":
            # Nearest upsampling in float32, as ml-mdm (bf16 interpolation is not exact).
            x = F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype)
        if self.resample is not None:
            x = self.resample(x)
            activations.append(x)
        elif self.resample_mode == "down":
            x = F.avg_pool2d(x, 2)
            activations.append(x)
        return x, activations
