"""Space-time pyramids for video (paper §4.3: text-to-video nested in time and space).

A clip is (B, C, F, H, W). Level r+1 of the pyramid keeps every k-th frame of level r
(k = F_r / F_{r+1}, starting at frame 0) and average-pools each kept frame by the side
factor, exactly as the image pyramid does. Frames are *subsampled*, not averaged: an
average of moving frames is a ghosted blend that no camera records, while a subsampled
frame is a real (smaller) image; so the innermost level can be a single frame, an image
model inside the video model, as in the paper's figure (1 frame nested in 16 frames).

Resolution shift of a space-time level (SPEC §2 generalised): with N_r = F_r H_r W_r
values per level and the base (innermost) level N_0, the ratio is s_r = sqrt(N_r / N_0),
i.e. ``side ratio * sqrt(frame ratio)``, and logSNR_r = logSNR - p ln(s_r). For equal
frame counts this is the image shift (s_r = side ratio). Counting frames is optional
(``temporal_shift``): consecutive frames are more redundant than neighbouring pixels, so
by default only the side enters the shift and the frames of a level share its SNR.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import torch.nn.functional as F
from torch import Tensor


def check_frames(frames: Sequence[int]) -> list[int]:
    """Frame counts per level, highest level first; each must be a multiple of the next one's."""
    counts = [int(f) for f in frames]
    if any(f < 1 for f in counts):
        raise ValueError(f"frame counts must be >= 1, got {counts}")
    for outer, inner in pairwise(counts):
        if outer % inner:
            raise ValueError(f"each level's frames must be a multiple of the next lower level's; got {counts}")
    return counts


def shift_ratio(side_ratio: float, frame_ratio: float, temporal_shift: bool) -> float:
    """s_r of the shifted schedule: the side ratio, times sqrt(frame ratio) when frames count."""
    return side_ratio * math.sqrt(frame_ratio) if temporal_shift else side_ratio


def downsample(x: Tensor, factor: int, frame_stride: int = 1) -> Tensor:
    """The next lower pyramid level: images (B, C, H, W) or clips (B, C, F, H, W)."""
    if x.ndim == 4:
        return F.avg_pool2d(x, factor)
    return F.avg_pool3d(x[:, :, ::frame_stride], (1, factor, factor))


def upsample(x: Tensor, factor: int, frame_stride: int = 1, mode: str = "bicubic") -> Tensor:
    """Back up one level: each frame interpolated in space, each frame repeated ``frame_stride`` times."""
    if x.ndim == 4:
        return F.interpolate(x, scale_factor=factor, mode=mode)
    batch, channels, frames, height, width = x.shape
    flat = x.transpose(1, 2).reshape(batch * frames, channels, height, width)
    up = F.interpolate(flat, scale_factor=factor, mode=mode)
    up = up.reshape(batch, frames, channels, height * factor, width * factor).transpose(1, 2)
    return up.repeat_interleave(frame_stride, dim=2) if frame_stride > 1 else up


def level_name(x: Tensor) -> str:
    """``HxW`` for an image level, ``FxHxW`` for a clip level (metric keys, file names)."""
    size = f"{x.shape[-2]}x{x.shape[-1]}"
    return f"{x.shape[2]}x{size}" if x.ndim == 5 else size
