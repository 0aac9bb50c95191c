"""CLIP score (Hessel et al. 2021): how well images match their texts, by a CLIP model.

``score = 100 * max(cos(image embedding, text embedding), 0)`` per image, averaged (the
convention of torchmetrics' ``CLIPScore``; Hessel et al. scale by 2.5 instead of 100). The
model is any Hugging Face ``CLIPModel`` given by hub name or local directory, e.g.
``openai/clip-vit-large-patch14`` (the usual choice for text-to-image papers) or
``openai/clip-vit-base-patch32``. Scores from different CLIP models are not comparable,
so every score is labelled with the model's name.

Images in [-1, 1] are resized (bicubic, antialiased) to the model's input size and
normalised with its processor's mean and standard deviation; for square images this is what
the Hugging Face processor does (resize the short side, centre crop) up to resampling details.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScorer:
    """Wraps a ``transformers.CLIPModel`` and its tokenizer.

    ``tokenizer(texts, padding=True, truncation=True, max_length=..., return_tensors="pt")``
    must return ``input_ids`` (and optionally ``attention_mask``), as Hugging Face tokenizers do.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name: str,
        image_size: int | None = None,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        batch_size: int = 64,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.image_size = int(image_size or model.config.vision_config.image_size)
        self.max_length = int(getattr(model.config.text_config, "max_position_embeddings", 77))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str | torch.device = "cpu", batch_size: int = 64) -> ClipScorer:
        """Load a CLIP model, tokenizer and processor settings by hub name or local path."""
        try:
            from transformers import AutoTokenizer, CLIPModel
        except ImportError as error:
            raise ImportError(
                "the CLIP score needs transformers: pip install -c constraints.txt transformers"
            ) from error
        try:
            model = CLIPModel.from_pretrained(name_or_path)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except OSError as error:
            raise FileNotFoundError(
                f"could not load the CLIP model {name_or_path!r} ({error}); give a local directory with a saved "
                f"CLIPModel and tokenizer, or a hub name on a machine with internet"
            ) from error
        mean, std, size = OPENAI_MEAN, OPENAI_STD, None
        try:
            from transformers import CLIPImageProcessor

            processor = CLIPImageProcessor.from_pretrained(name_or_path)
            mean, std = processor.image_mean, processor.image_std
            crop = getattr(processor, "crop_size", None)
            size = crop.get("height") if isinstance(crop, dict) else crop
        except (OSError, ImportError, ValueError):
            pass
        name = Path(str(name_or_path).rstrip("/")).name or str(name_or_path)
        return cls(model.to(device), tokenizer, name, size, mean, std, batch_size)

    def preprocess(self, images: Tensor) -> Tensor:
        images = images.float().to(self.device)
        size = (self.image_size, self.image_size)
        if images.shape[-2:] != size:
            shrinking = images.shape[-1] > self.image_size
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=shrinking)
        images = ((images.clamp(-1, 1) + 1) / 2).clamp(0, 1)
        return (images - self.mean.to(images.device)) / self.std.to(images.device)

    @torch.no_grad()
    def image_embeddings(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [-1, 1] -> unit-norm embeddings (N, E)."""
        outputs = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.preprocess(images[start : start + self.batch_size])
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            outputs.append(F.normalize(self.model.visual_projection(pooled).float(), dim=-1).cpu())
        return torch.cat(outputs)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> Tensor:
        """Texts -> unit-norm embeddings (N, E)."""
        outputs = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            mask = tokens.get("attention_mask")
            pooled = self.model.text_model(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=None if mask is None else mask.to(self.device),
            ).pooler_output
            outputs.append(F.normalize(self.model.text_projection(pooled).float(), dim=-1).cpu())
        return torch.cat(outputs)

    def similarities(self, images: Tensor, texts: Sequence[str]) -> Tensor:
        """Cosine similarity of each image with its text."""
        if len(images) != len(texts):
            raise ValueError(f"CLIP score needs one text per image, got {len(images)} images and {len(texts)} texts")
        unique = sorted(set(texts))
        table = self.text_embeddings(unique)
        text = table[[unique.index(t) for t in texts]]
        return (self.image_embeddings(images) * text).sum(-1)

    def scores(self, images: Tensor, texts: Sequence[str]) -> Tensor:
        """Per-image CLIP score ``100 * max(cos, 0)``."""
        return 100 * self.similarities(images, texts).clamp(min=0)

    def score(self, images: Tensor, texts: Sequence[str]) -> float:
        return float(self.scores(images, texts).mean())
