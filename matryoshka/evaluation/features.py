"""Feature networks by name, behind one interface.

``build_feature_extractor("effnet-lite0" | "inception")`` returns a :class:`FeatureExtractor`:
call it on images in [-1, 1] (any square size) to get float32 features (N, dim). Every image
is first rounded to 8 bits, as if written to a PNG and read back, so generated samples,
pooled pyramid levels and dataset images are all measured on the same footing.

Every number computed from these features is labelled with ``extractor.name``; only
``inception`` with the standard weights (``extractor.fid_comparable``) gives FIDs that can be
compared with published ones.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .errors import EvaluationError

FEATURE_NETWORKS = ("effnet-lite0", "inception")
INCEPTION_SHA256_PREFIX = "6726825d"


@dataclass
class FeatureExtractor:
    name: str
    """Short id used in metric names, e.g. ``effnet-lite0``."""
    dim: int
    network: nn.Module = field(repr=False)
    preprocess: Callable[[Tensor], Tensor] = field(repr=False)
    weights: str = ""
    """Where the weights came from (file name and SHA-256 prefix, or package)."""
    fid_comparable: bool = False
    batch_size: int = 64

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "weights": self.weights, "fid_comparable": self.fid_comparable}

    @torch.no_grad()
    def __call__(self, images: Tensor) -> np.ndarray:
        """(N, 3, H, W) images in [-1, 1] -> (N, dim) float32 features."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images (N, 3, H, W), got {tuple(images.shape)}")
        outputs = []
        for start in range(0, len(images), self.batch_size):
            batch = self.preprocess(quantize(images[start : start + self.batch_size].to(self.device)))
            outputs.append(self.network.features(batch.contiguous(memory_format=torch.channels_last)).float().cpu())
        if not outputs:
            return np.zeros((0, self.dim), np.float32)
        return torch.cat(outputs).numpy()


def quantize(images: Tensor) -> Tensor:
    """Round [-1, 1] images to the 256 levels of an 8-bit image (and clamp)."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round()
    return pixels / 127.5 - 1


def uint8_to_images(pixels: np.ndarray | Tensor) -> Tensor:
    """(N, 3, H, W) uint8 -> float images in [-1, 1]."""
    return torch.as_tensor(np.asarray(pixels)).float() / 127.5 - 1


def images_to_uint8(images: Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> uint8 (N, 3, H, W)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inception_weights_available(path: str | Path | None = None) -> bool:
    """True when Inception weights can be had without a download."""
    from .inception import resolve_weights

    try:
        resolve_weights(path, download=False)
    except FileNotFoundError:
        return False
    return True


def resolve_feature_name(name: str | None, inception_weights: str | Path | None = None) -> str:
    """``auto`` (or None): ``inception`` when its weights are on this machine, else ``effnet-lite0``."""
    if name in (None, "auto"):
        return "inception" if inception_weights_available(inception_weights) else "effnet-lite0"
    if name not in FEATURE_NETWORKS:
        raise EvaluationError(
            f"unknown feature network {name!r}; choose one of {', '.join(FEATURE_NETWORKS)} (or auto)"
        )
    return name


_CACHE: dict[tuple, FeatureExtractor] = {}


def _inference(network: nn.Module, device: torch.device) -> nn.Module:
    """Batch norms folded, channels-last memory (several times faster depthwise convolutions on CPUs)."""
    return fuse_batchnorm(network).to(device, memory_format=torch.channels_last).requires_grad_(False)


def build_feature_extractor(
    name: str = "effnet-lite0",
    inception_weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    download: bool = True,
) -> FeatureExtractor:
    """The named feature network with its weights, on ``device`` (cached per process)."""
    name = resolve_feature_name(name, inception_weights)
    device = torch.device(device)
    key = (name, str(inception_weights or os.environ.get("MATRYOSHKA_INCEPTION_WEIGHTS", "")), str(device))
    if key in _CACHE:
        extractor = _CACHE[key]
        extractor.batch_size = batch_size
        return extractor
    if name == "effnet-lite0":
        from . import efficientnet

        path = efficientnet.shipped_weights_path()
        network = efficientnet.load_efficientnet_lite0(path)
        extractor = FeatureExtractor(
            name,
            efficientnet.FEATURE_DIM,
            _inference(network, device),
            efficientnet.preprocess,
            weights=f"{efficientnet.WEIGHTS_PACKAGE}:{path.name}",
            batch_size=batch_size,
        )
    else:
        from . import inception

        path = inception.resolve_weights(inception_weights, download=download)
        digest = file_sha256(path)
        network = inception.load_fid_inception(path)
        extractor = FeatureExtractor(
            name,
            inception.FEATURE_DIM,
            _inference(network, device),
            inception.preprocess,
            weights=f"{path.name} sha256:{digest[:16]}",
            fid_comparable=digest.startswith(INCEPTION_SHA256_PREFIX),
            batch_size=batch_size,
        )
    _CACHE[key] = extractor
    return extractor


@torch.no_grad()
def fuse_batchnorm(network: nn.Module) -> nn.Module:
    """Fold every (convolution, batch norm) pair the network lists in ``conv_bn_pairs()`` into
    the convolution, for inference: the same function, fewer passes over memory. The
    network's state dict changes (biases appear, batch norms vanish): load weights first."""
    for owner, conv_name, bn_name in list(network.conv_bn_pairs()):
        conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
        if not isinstance(bn, nn.BatchNorm2d):
            continue
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv.weight.mul_(scale.view(-1, 1, 1, 1))
        bias = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        conv.bias = nn.Parameter(bias)
        setattr(owner, bn_name, nn.Identity())
    return network.eval()
