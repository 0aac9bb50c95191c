"""The text-encoder interface and the batch of embeddings it returns.

A :class:`TextEncoder` turns a list of prompts into a :class:`TextEmbedding`: per-token
vectors ``tokens`` (B, L, dim), a padding ``mask`` (B, L; True for real tokens) and a
``pooled`` (B, dim) vector per prompt. Encoders are frozen (eval mode, no gradients) and
run under ``torch.no_grad``.

The denoiser reads an all-False mask row as the null ("no text") condition; see
:func:`null_mask_rows` for caption dropout.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models.conditioning import Conditioning


@dataclass
class TextEmbedding:
    """A batch of encoded prompts.

    Padded positions (``mask`` False) of ``tokens`` are always zero, so a model that
    ignores the mask sees zeros there (as ml-mdm's models do).
    """

    tokens: torch.Tensor
    """(B, L, dim) float per-token embeddings."""
    mask: torch.Tensor
    """(B, L) bool, True for real tokens. A row of all False is the null condition."""
    pooled: torch.Tensor
    """(B, dim) float: the masked mean of ``tokens`` or the model's own pooled output."""

    def __post_init__(self) -> None:
        if self.tokens.dim() != 3 or self.mask.shape != self.tokens.shape[:2]:
            raise ValueError(
                f"tokens (B, L, D) and mask (B, L) disagree: {tuple(self.tokens.shape)} vs {tuple(self.mask.shape)}"
            )
        if self.mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool, got {self.mask.dtype}")
        if self.pooled.shape != (self.tokens.shape[0], self.tokens.shape[2]):
            raise ValueError(
                f"pooled must be (B, D) = {(self.tokens.shape[0], self.tokens.shape[2])}, got "
                f"{tuple(self.pooled.shape)}"
            )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def length(self) -> int:
        """Token positions per row (L)."""
        return self.tokens.shape[1]

    @property
    def dim(self) -> int:
        return self.tokens.shape[2]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEmbedding:
        """Move (and optionally cast the float tensors); the mask stays bool."""
        return TextEmbedding(
            self.tokens.to(device=device, dtype=dtype),
            self.mask.to(device=device),
            self.pooled.to(device=device, dtype=dtype),
        )

    def select(self, index: torch.Tensor | slice | Sequence[int]) -> TextEmbedding:
        """Rows ``index`` of the batch."""
        if isinstance(index, (list, tuple)):
            index = torch.as_tensor(index, dtype=torch.long, device=self.tokens.device)
        return TextEmbedding(self.tokens[index], self.mask[index], self.pooled[index])

    def pad_to(self, length: int) -> TextEmbedding:
        """Zero-pad (mask False) to ``length`` token positions; never truncates."""
        extra = length - self.length
        if extra < 0:
            raise ValueError(f"cannot pad {self.length} tokens to a shorter length {length}")
        if extra == 0:
            return self
        tokens = torch.nn.functional.pad(self.tokens, (0, 0, 0, extra))
        mask = torch.nn.functional.pad(self.mask, (0, extra))
        return TextEmbedding(tokens, mask, self.pooled)

    def trim(self) -> TextEmbedding:
        """Drop trailing positions that are padding in every row (at least one position is kept)."""
        used = self.mask.any(dim=0).nonzero()
        length = max(int(used.max()) + 1 if used.numel() else 1, 1)
        if length == self.length:
            return self
        return TextEmbedding(self.tokens[:, :length], self.mask[:, :length], self.pooled)

    @staticmethod
    def cat(items: Sequence[TextEmbedding]) -> TextEmbedding:
        """Concatenate batches, padding them to the longest."""
        if not items:
            raise ValueError("nothing to concatenate")
        length = max(item.length for item in items)
        padded = [item.pad_to(length) for item in items]
        return TextEmbedding(
            torch.cat([p.tokens for p in padded]),
            torch.cat([p.mask for p in padded]),
            torch.cat([p.pooled for p in padded]),
        )

    def conditioning(self, **fields) -> Conditioning:
        """A :class:`Conditioning` carrying these tokens and mask (plus ``fields``, e.g. labels, micro)."""
        return Conditioning(text=self.tokens, text_mask=self.mask, **fields)


def null_mask_rows(embedding: TextEmbedding, drop: torch.Tensor) -> TextEmbedding:
    """Turn the rows where ``drop`` is True into the null condition.

    Those rows get zero tokens, a zero pooled vector and an all-False mask, which the
    NestedUNet reads as "no text" (no cross-attention, zero pooled embedding). Used for
    caption dropout, so that classifier-free guidance is trained. ``drop``: (B,) bool.
    Returns a new embedding; the input is not modified.
    """
    drop = torch.as_tensor(drop, device=embedding.tokens.device)
    if drop.dtype != torch.bool or drop.shape != (len(embedding),):
        raise ValueError(
            f"drop must be a bool tensor of shape ({len(embedding)},), got {drop.dtype} {tuple(drop.shape)}"
        )
    keep = ~drop
    tokens = embedding.tokens * keep[:, None, None].to(embedding.tokens.dtype)
    pooled = embedding.pooled * keep[:, None].to(embedding.pooled.dtype)
    mask = embedding.mask & keep[:, None]
    return TextEmbedding(tokens, mask, pooled)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``tokens`` (B, L, D) over positions where ``mask`` (B, L) is True; zero for empty rows."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU that supports it, fp32 otherwise (CPU, or GPUs without bf16)."""
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class TextEncoder(abc.ABC):
    """A frozen text encoder: prompts -> :class:`TextEmbedding`.

    Subclasses set ``name``, ``dim`` (token width) and ``max_length`` (tokens per prompt,
    special tokens included; longer prompts are truncated, never dropped) and implement
    :meth:`encode`. Every prompt, the empty string included, yields at least one real token
    (for Hugging Face encoders the tokenizer's special tokens, e.g. ``[CLS] [SEP]`` or
    ``</s>``), so an encoded prompt is never confused with the null condition.
    """

    name: str
    dim: int
    max_length: int
    device: torch.device
    dtype: torch.dtype

    @property
    def id(self) -> str:
        """Identifies the embeddings this encoder produces (cache key): name and max_length."""
        return f"{self.name}@{self.max_length}"

    @abc.abstractmethod
    def encode(self, prompts: Sequence[str], device: torch.device | str | None = None) -> TextEmbedding:
        """Encode ``prompts``; the result is on ``device`` (default: the encoder's) in float32,
        padded to the longest prompt of the batch."""

    def __call__(self, prompts: Sequence[str], device: torch.device | str | None = None) -> TextEmbedding:
        return self.encode(prompts, device=device)

    def to(self, device: torch.device | str) -> TextEncoder:
        """Move the encoder (subclasses with weights override this)."""
        self.device = torch.device(device)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, dim={self.dim}, device={self.device}, dtype={self.dtype})"
