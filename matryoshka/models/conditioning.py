"""What a denoiser is conditioned on, as one batch-shaped object.

Samplers only need two operations from it: concatenating a conditional and an
unconditional batch for classifier-free guidance, and producing the
unconditional version. Everything optional stays ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

NULL_LABEL = -1
"""Label value meaning "no class": the model maps it to its learned null embedding."""


@dataclass
class Conditioning:
    labels: torch.Tensor | None = None
    """(B,) int64 class indices; ``NULL_LABEL`` selects the learned null class."""
    text: torch.Tensor | None = None
    """(B, L, D) frozen text-encoder token embeddings."""
    text_mask: torch.Tensor | None = None
    """(B, L) bool, True for real tokens. A row of all False is the null text condition."""
    micro: dict[str, torch.Tensor] = field(default_factory=dict)
    """Micro-conditioning values, e.g. ``{"scale": (B,)}``; missing keys use the model's defaults."""

    def __post_init__(self) -> None:
        if self.text is not None and self.text_mask is None:
            self.text_mask = torch.ones(self.text.shape[:2], dtype=torch.bool, device=self.text.device)

    def _tensors(self) -> dict[str, torch.Tensor | None]:
        return {"labels": self.labels, "text": self.text, "text_mask": self.text_mask}

    @property
    def batch_size(self) -> int | None:
        for value in (*self._tensors().values(), *self.micro.values()):
            if value is not None:
                return value.shape[0]
        return None

    def cat(self, other: Conditioning) -> Conditioning:
        """Batch concatenation ``[self, other]``; both must carry the same fields."""

        def join(a: torch.Tensor | None, b: torch.Tensor | None, name: str) -> torch.Tensor | None:
            if (a is None) != (b is None):
                raise ValueError(f"cannot concatenate conditionings: only one has '{name}'")
            if a is None:
                return None
            if a.dim() == 3 and a.shape[1] != b.shape[1]:  # pad token sequences to one length
                length = max(a.shape[1], b.shape[1])
                a, b = (torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[1])) for x in (a, b))
            if a.dim() == 2 and a.dtype == torch.bool and a.shape[1] != b.shape[1]:
                length = max(a.shape[1], b.shape[1])
                a, b = (torch.nn.functional.pad(x, (0, length - x.shape[1])) for x in (a, b))
            return torch.cat([a, b])

        mine, theirs = self._tensors(), other._tensors()
        joined = {name: join(mine[name], theirs[name], name) for name in mine}
        if set(self.micro) != set(other.micro):
            raise ValueError("cannot concatenate conditionings with different micro-conditioning keys")
        micro = {key: torch.cat([self.micro[key], other.micro[key]]) for key in self.micro}
        return Conditioning(**joined, micro=micro)

    def head(self, count: int) -> Conditioning:
        """The conditioning of the first ``count`` samples."""
        fields = {name: None if value is None else value[:count] for name, value in self._tensors().items()}
        return Conditioning(**fields, micro={key: value[:count] for key, value in self.micro.items()})

    def unconditional(self) -> Conditioning:
        """The null condition of the same batch: null labels and empty text."""
        labels = None if self.labels is None else torch.full_like(self.labels, NULL_LABEL)
        mask = None if self.text_mask is None else torch.zeros_like(self.text_mask)
        text = None if self.text is None else torch.zeros_like(self.text)
        return Conditioning(labels=labels, text=text, text_mask=mask, micro=dict(self.micro))
