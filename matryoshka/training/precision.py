"""Choosing the training precision: bf16 autocast where the hardware makes it pay.

On CUDA bf16 autocast is always worth it. On a CPU it depends on the instruction set: with
AVX512-BF16 or AMX a bf16 training step measured 1.6x faster than fp32 on 2 cores, but on a
CPU without them (AVX2 only) PyTorch emulates bf16 and the same step ran over 50x slower.
So ``precision=auto`` on a CPU asks the kernel's CPU flags first, then checks that a bf16
convolution agrees with fp32 and is really faster, before turning autocast on.
"""

from __future__ import annotations

import functools
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The instruction-set flags the kernel reports (empty where there is no /proc/cpuinfo)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _time(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def cpu_bf16_pays() -> bool:
    """True when bf16 autocast on this CPU is native, numerically sane and faster than fp32."""
    if not any(flag in cpu_flags() for flag in BF16_CPU_FLAGS):
        return False
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, 32, 32, generator=generator)
    weight = torch.randn(64, 64, 3, 3, generator=generator) / 24

    def conv(dtype: torch.dtype) -> torch.Tensor:
        context = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
        with context:
            return F.conv2d(x, weight, padding=1).float()

    reference = conv(torch.float32)
    error = (conv(torch.bfloat16) - reference).norm() / reference.norm()
    if not error < 2e-2:  # bf16 keeps 8 mantissa bits: about 0.4% relative error per product
        return False
    return _time(lambda: conv(torch.bfloat16)) < 0.8 * _time(lambda: conv(torch.float32))


def use_bf16(precision: str, device: torch.device) -> bool:
    """Resolve ``train.precision``: an explicit fp32/bf16 always wins; auto decides per device."""
    if precision in ("fp32", "bf16"):
        return precision == "bf16"
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r}; valid: auto, fp32, bf16")
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_bf16_pays()


def use_channels_last(setting: bool | None, device: torch.device, bf16: bool, magnitude_preserving: bool) -> bool:
    """Resolve ``train.channels_last``: an explicit value wins; auto skips it for bf16 on a CPU with
    GroupNorm blocks, whose channels-last bf16 steps ran 15-18% slower than contiguous ones (the
    magnitude-preserving blocks', which have no GroupNorm, ran faster: twenty-second round)."""
    if setting is not None:
        return setting
    return not (device.type == "cpu" and bf16 and not magnitude_preserving)
