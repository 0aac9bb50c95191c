"""Memory of a video training step, measured small on the CPU and extrapolated (docs/video.md#scale).

    python benchmarks/video_memory.py                        # ml-mdm's 256² model, 16 frames at 256²
    python benchmarks/video_memory.py --gpus 1,8,64 --batch 1
    python benchmarks/video_memory.py --preset tiny-video --target-frames 4 --target-side 96 \\
        --check                                               # measure the target too (small models only)

The model is the preset's NestedUNet with every level space-time (temporal layers after every
ResNet block) and the same frame count F at every level. For each small clip size (F frames,
side S) one training step runs on the CPU in fp32: the loss of the space-time pyramid and its
backward, with and without activation checkpointing (``model.gradient_checkpointing``). A
dispatch mode counts the bytes of every tensor storage the step makes while it is alive; the
peak of that count is the step's activation memory (what the forward keeps for the backward plus
the backward's temporaries). Parameter gradients are allocated before the step, so they are
counted with the training state instead.

Almost every layer works per frame and per pixel; the exception is spatial self-attention, whose
q, k, v layout (heads split off the channel axis, ``models/layers.py``) sends PyTorch's
scaled_dot_product_attention to its math kernel on CPUs and GPUs alike, and that kernel makes
each layer's (heads, N, N) attention matrix of N = H·W tokens per frame. So the peak is modelled as

    peak(F, S) = a·F·S² + c·F + d + m·A(F, S)

where A is the bytes of one fp32 attention matrix per spatial attention call of the step (all
calls; without checkpointing they are all kept for the backward) or of the largest call alone
(with checkpointing, one layer is recomputed at a time), recorded at the measured sizes and
growing as F·S⁴, and m is the number of such matrices, measured on one of the model's attention
layers alone (1 kept without checkpointing, 3 at its backward's peak with the math kernel; 0
with a fused kernel). (a, c, d) are fitted on four sizes and checked on a fifth, the largest side (the
prediction error is reported), then the model is evaluated at the target size. ``--check``
measures the target too, for models small enough. The training state is counted per
parameter: fp32 weights, gradients, AdamW's two moments and the EMA copy (20 bytes). FSDP2
(``train.strategy=fsdp``) shards all of it over N GPUs and all-gathers one unit (a ``Stage``) at
a time; activations are per GPU whatever the strategy. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
import weakref
from dataclasses import replace

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from matryoshka.diffusion.process import MatryoshkaDiffusion
from matryoshka.diffusion.schedules import make_schedule
from matryoshka.models import Conditioning, NestedUNet, model_preset
from matryoshka.models.config import ModelConfig
from matryoshka.models.layers import Attention, Stage
from matryoshka.models.temporal import is_temporal_parameter

GIB = 2**30
STATE_BYTES = {"weights": 4, "gradients": 4, "adamw_moments": 8, "ema": 4}
"""Bytes per parameter of the training state (fp32 throughout; bf16 autocast keeps fp32 weights)."""


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages made inside the mode that are still alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's memory (a weight's transpose, a gradient's add_),
        # which may have been made before the mode: only storages that no input holds are new.
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        if storage in self._seen:  # the same memory returned again
            return
        size = storage.nbytes()
        self._seen[storage] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        # Storages keep their Python object while autograd holds them, so this runs when the memory goes.
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size


def video_config(preset: str, levels_frames: int) -> ModelConfig:
    """The preset with every level space-time and ``levels_frames`` frames at every level."""
    config = model_preset(preset)
    levels = [replace(level, temporal=True) for level in config.levels]
    return replace(config, levels=levels, frames=[levels_frames] * len(levels))


def set_checkpointing(model: NestedUNet, on: bool) -> None:
    # The flag is read at every forward, so one model serves both measurements (building it twice
    # would double the seconds and the memory of the largest presets).
    for module in model.modules():
        if isinstance(module, Stage):
            module.checkpointing = on


def step_peak(model: NestedUNet, frames: int, side: int, batch: int, text_tokens: int) -> dict[str, int]:
    """Peak and end-of-forward bytes made by one training step on (batch, 3, frames, side, side) clips,
    and the bytes of one fp32 attention matrix of every spatial attention call (their sum and largest)."""
    config = model.config  # the model takes clips of any frame count; its config's are the default
    process = MatryoshkaDiffusion(
        make_schedule("squaredcos"),
        config.num_levels,
        max(config.nest_ratio, 2),
        frames=[frames] * config.num_levels,
        self_condition=config.self_condition,
    )
    generator = torch.Generator().manual_seed(0)
    clips = torch.rand(batch, config.in_channels, frames, side, side, generator=generator) * 2 - 1
    cond = None
    if config.text_dim:
        cond = Conditioning(text=torch.randn(batch, text_tokens, config.text_dim, generator=generator))
    matrices: dict[int, int] = {}  # per layer: a checkpointed layer runs twice but keeps one matrix

    def record(layer: Attention, inputs: tuple) -> None:
        x = inputs[0]  # (B·F, C, H, W)
        matrices[id(layer)] = 4 * x.shape[0] * layer.heads * (x.shape[2] * x.shape[3]) ** 2

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, Attention)]
    try:
        with LiveBytes() as counter:
            loss, _ = process.loss(model, clips, cond, generator=generator)
            forward = counter.live
            loss.backward()
            del loss
    finally:
        for hook in hooks:
            hook.remove()
    sizes = list(matrices.values()) or [0]
    return {"peak": counter.peak, "forward": forward, "attention_all": sum(sizes), "attention_max": max(sizes)}


def attention_matrices(model: NestedUNet, text_tokens: int) -> dict[str, float]:
    """How many (heads, N, N) fp32 matrices one spatial attention layer keeps for its backward, and
    holds at its backward's peak: the N² coefficient of its memory, measured at three token counts."""
    layer = next((m for m in model.modules() if isinstance(m, Attention)), None)
    if layer is None:
        return {"kept": 0.0, "backward_peak": 0.0}
    tokens = None
    if layer.kv_cond is not None:  # the text's keys and values: memory that does not grow with N
        tokens = torch.randn(1, text_tokens, layer.kv_cond.in_features)
    counts, kept, peak = [], [], []
    for side in (8, 16, 32):
        x = torch.randn(1, layer.qkv.in_channels, side, side, requires_grad=True)
        with LiveBytes() as counter:
            out = layer(x, tokens)
            kept.append(counter.live)
            out.sum().backward()
            del out
        counts.append(side * side)
        peak.append(counter.peak)
    # memory = gamma + alpha·N + beta·N²; beta in units of one (heads, N, N) fp32 matrix.
    features = np.array([[1.0, n, n * n] for n in counts])
    unit = 4 * layer.heads
    return {
        "kept": round(float(np.linalg.solve(features, kept)[2]) / unit, 2),
        "backward_peak": round(float(np.linalg.solve(features, peak)[2]) / unit, 2),
    }


class PeakModel:
    """peak(F, S) = a·F·S² + c·F + d + m·A(F, S), A growing as F·S⁴ from a measured size (module docstring)."""

    def __init__(self, points: list[dict], matrices: float, attention_key: str) -> None:
        self.matrices, self.key = matrices, attention_key
        self.reference = points[0]  # A is scaled from here
        features = np.array([self._linear_features(p["frames"], p["side"]) for p in points])
        rest = np.array([p["peak"] - self.matrices * p[attention_key] for p in points], float)
        self.coefficients = np.linalg.lstsq(features, rest, rcond=None)[0]

    @staticmethod
    def _linear_features(frames: int, side: int) -> list[float]:
        return [frames * side**2, frames, 1.0]

    def attention(self, frames: int, side: int) -> float:
        ref = self.reference
        return self.matrices * ref[self.key] * frames / ref["frames"] * (side / ref["side"]) ** 4

    def __call__(self, frames: int, side: int) -> float:
        return float(self.coefficients @ self._linear_features(frames, side)) + self.attention(frames, side)


def measure(model: NestedUNet, sizes: list[tuple[int, int]], matrices: float, attention_key: str, args) -> dict:
    """Peaks at ``sizes`` (fitted on all but the last, checked on the last) and the extrapolation."""
    points = []
    for frames, side in sizes:
        start = time.perf_counter()
        point = {"frames": frames, "side": side, **step_peak(model, frames, side, 1, args.text_tokens)}
        points.append({**point, "seconds": round(time.perf_counter() - start, 2)})
    peak = PeakModel(points[:-1], matrices, attention_key)
    held_out = points[-1]
    per_clip = peak(args.target_frames, args.target_side)
    a, c, d = peak.coefficients
    return {
        "points": points,
        "fit_bytes": {"per_frame_pixel": round(a, 1), "per_frame": round(c), "constant": round(d)},
        "attention_matrices": matrices,
        "held_out_error": round(peak(held_out["frames"], held_out["side"]) / held_out["peak"] - 1, 4),
        "target_per_clip_GiB": round(per_clip / GIB, 3),
        "target_attention_per_clip_GiB": round(peak.attention(args.target_frames, args.target_side) / GIB, 3),
        "target_batch_GiB": round(args.batch * per_clip / GIB, 3),
    }


def largest_unit(model: NestedUNet) -> int:
    """Parameters of the largest FSDP2 unit: a Stage, or the rest of the model (``training/parallel.py``)."""
    stages = [module for module in model.modules() if isinstance(module, Stage)]
    in_stages = {id(p) for stage in stages for p in stage.parameters()}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in in_stages)
    return max([rest] + [sum(p.numel() for p in stage.parameters()) for stage in stages])


def per_gpu(parameters: int, unit: int, activations: dict[str, float], gpus: list[int]) -> list[dict]:
    """GiB per GPU: DDP keeps the whole state on each, FSDP2 1/N of it plus three gathered units."""
    state = sum(STATE_BYTES.values()) * parameters / GIB
    # FSDP2 prefetches the next unit while computing one: two units of fp32 weights, and one unit's
    # unsharded gradients while they are reduce-scattered.
    gathered = 3 * 4 * unit / GIB
    rows = []
    for n in gpus:
        for strategy, resident in (("ddp", state), ("fsdp2", state / n + (gathered if n > 1 else 0))):
            totals = {mode: round(resident + value, 2) for mode, value in activations.items()}
            rows.append({"gpus": n, "strategy": strategy, "state_GiB": round(resident, 2), "total_GiB": totals})
    return rows


def parse_sizes(frames: str, sides: str) -> list[tuple[int, int]]:
    """Four fit sizes, (F0, S0), (F1, S0), (F0, S1), (F1, S1), then the held-out (F0, S2): the check
    is on the largest side, the direction of the extrapolation."""
    f = [int(v) for v in frames.split(",")]
    s = [int(v) for v in sides.split(",")]
    if len(f) != 2 or len(s) != 3 or f != sorted(set(f)) or s != sorted(set(s)):
        raise SystemExit("--frames takes two increasing values, --sides three, e.g. --frames 2,4 --sides 16,32,48")
    return [(f[0], s[0]), (f[1], s[0]), (f[0], s[1]), (f[1], s[1]), (f[0], s[2])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mlmdm-256", help="model preset (matryoshka/models/presets.py)")
    parser.add_argument("--frames", default="2,4", help="two frame counts measured")
    parser.add_argument("--sides", default="16,32,48", help="three top-level sides measured (the last held out)")
    parser.add_argument("--target-frames", type=int, default=16)
    parser.add_argument("--target-side", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1, help="clips per GPU at the target size")
    parser.add_argument("--text-tokens", type=int, default=77, help="text tokens per clip (text models)")
    parser.add_argument("--gpus", default="1,8", help="GPU counts of the per-GPU table")
    parser.add_argument("--check", action="store_true", help="also measure the target size (small models only)")
    args = parser.parse_args()
    sizes = parse_sizes(args.frames, args.sides)
    config = video_config(args.preset, sizes[0][0])
    # Every level's side must survive the nesting and the innermost UNet's downsampling.
    multiple = config.nest_ratio ** (config.num_levels - 1) * config.levels[0].downsampling
    bad = [side for side in [side for _, side in sizes] + [args.target_side] if side % multiple]
    if bad:
        raise SystemExit(f"sides {bad} are not multiples of {multiple}, which {args.preset} needs")

    torch.manual_seed(0)
    start = time.perf_counter()
    model = NestedUNet(config).train()
    for parameter in model.parameters():  # allocated now: the step's peak is activations only
        parameter.grad = torch.zeros_like(parameter)
    build_seconds = time.perf_counter() - start
    parameters = sum(p.numel() for p in model.parameters())
    temporal = sum(p.numel() for name, p in model.named_parameters() if is_temporal_parameter(name))

    report: dict = {
        "preset": args.preset,
        "levels": [f"{args.target_frames}x{side}" for side in model.config.level_sides(args.target_side)],
        "parameters_M": round(parameters / 1e6, 1),
        "temporal_parameters_M": round(temporal / 1e6, 1),
        "build_seconds": round(build_seconds, 1),
        "device": f"cpu fp32 ({torch.get_num_threads()} threads)",
        "target": {"frames": args.target_frames, "side": args.target_side, "batch_per_gpu": args.batch},
    }
    matrices = attention_matrices(model, args.text_tokens)
    report["attention_matrices_per_layer"] = matrices
    activations = {}
    modes = (
        ("plain", False, matrices["kept"], "attention_all"),
        ("checkpointing", True, matrices["backward_peak"], "attention_max"),
    )
    for mode, on, count, key in modes:
        set_checkpointing(model, on)
        result = measure(model, sizes, count, key, args)
        if args.check:
            measured = step_peak(model, args.target_frames, args.target_side, 1, args.text_tokens)["peak"]
            result["target_measured_GiB"] = round(measured / GIB, 4)
        report[mode] = result
        activations[mode] = result["target_batch_GiB"]
    unit = largest_unit(model)
    report["training_state_GiB"] = {k: round(v * parameters / GIB, 2) for k, v in STATE_BYTES.items()}
    report["largest_fsdp_unit_M"] = round(unit / 1e6, 1)
    report["per_gpu"] = per_gpu(parameters, unit, activations, [int(n) for n in args.gpus.split(",")])
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
