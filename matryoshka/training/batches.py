"""From a data batch to what one training step needs: images, per-sample randomness, conditioning.

A video run with ``data.image_source`` also trains on images, as one-frame clips: the temporal
layers skip them (``models/temporal.py``), so they train the spatial layers only.

Each sample's timestep, noise and condition dropout come from (seed, step, dataset index),
so they do not depend on how the global batch is split over processes or micro-batches.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.loader import mix_seed
from ..diffusion.process import MatryoshkaDiffusion
from ..diffusion.spacetime import downsample
from ..models import NULL_LABEL, Conditioning

IMAGES_SEED = 0x1A6E5
"""Mixed into the seeds of the images that joint training adds to a video run (their order, noise,
condition dropout and network dropout), so they never repeat the clips' random draws."""


def one_frame_clips(batch: dict) -> dict:
    """An image batch as one-frame clips (B, C, 1, H, W): how a video model takes images."""
    return {**batch, "image": batch["image"].unsqueeze(2)}


def top_images(
    batch: dict, device: torch.device, missing_levels: int, nest_ratio: int, frame_stride: int = 1
) -> torch.Tensor:
    """The batch (images or clips) at the top level of a model that lacks the outermost
    ``missing_levels``; ``frame_stride``: full clip frames per frame of that level."""
    images = batch["image"].to(device, non_blocking=True)
    factor = nest_ratio**missing_levels
    return downsample(images, factor, frame_stride) if factor > 1 else images


def sample_randomness(
    process: MatryoshkaDiffusion,
    indices: list[int],
    images: torch.Tensor,
    seed: int,
    step: int,
    cond_drop_prob: float,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Timestep, noise pyramid and condition-dropout flag of each sample."""
    device = images.device
    shapes = [level.shape[1:] for level in process.pyramid(images[:1])]
    steps, noise, drop = [], [[] for _ in shapes], []
    for index in indices:
        generator = torch.Generator(device).manual_seed(mix_seed(seed, step, index))
        steps.append(process.sample_timesteps(1, generator, device))
        for level, shape in enumerate(shapes):
            noise[level].append(torch.randn(shape, generator=generator, device=device))
        drop.append(torch.rand(1, generator=generator, device=device))
    return torch.cat(steps), [torch.stack(level) for level in noise], torch.cat(drop) < cond_drop_prob


def batch_conditioning(
    batch: dict, drop: torch.Tensor, class_conditional: bool, embed_captions, device: torch.device
) -> Conditioning | None:
    """Labels and/or caption embeddings (``embed_captions(captions, device=)``), dropped ones made null."""
    labels = text = mask = None
    if class_conditional:
        labels = batch["label"].to(device)
        labels = torch.where(drop, torch.full_like(labels, NULL_LABEL), labels)
    if embed_captions is not None:
        from ..text import null_mask_rows

        embedding = null_mask_rows(embed_captions(list(batch["caption"]), device=device), drop)
        text, mask = embedding.tokens, embedding.mask
    if labels is None and text is None:
        return None
    return Conditioning(labels=labels, text=text, text_mask=mask)


def caption_embedder(encoder, cache_dir: str | None):
    """How training embeds captions: the text encoder, through the on-disk embedding cache when
    ``text.cache_dir`` is set; None for models without text."""
    if encoder is None:
        return None
    if not cache_dir:
        return encoder.encode
    from ..text import TextEmbeddingCache

    return TextEmbeddingCache(Path(cache_dir).expanduser(), encoder).get
