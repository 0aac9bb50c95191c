"""Training-step throughput and peak memory of a model preset on this machine.

    python benchmarks/train_throughput.py --preset emoji64 --batch-size 32 --steps 10
    python benchmarks/train_throughput.py --preset mlmdm-256 --batch-size 8 --device cuda --bf16
    python benchmarks/train_throughput.py --preset emoji64 --batch-size 16 --channels-last \
        --set levels.0.res_blocks=[2,2,2]

Times full optimizer steps (forward, loss on every level, backward, AdamW) on random
data after warm-up steps, so it measures the model and the diffusion loss, not the
data pipeline. Prints one JSON line; for a video preset ``images_per_s`` counts clips, ``frames_per_s`` their frames.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

from matryoshka.config import apply_overrides, from_dict, to_dict
from matryoshka.diffusion.process import MatryoshkaDiffusion
from matryoshka.diffusion.schedules import make_schedule
from matryoshka.models import Conditioning, NestedUNet, model_preset
from matryoshka.models.config import ModelConfig

DEFAULT_RESOLUTION = {
    "tiny": 16,
    "emoji64": 64,
    "unet64": 64,
    "mlmdm-64": 64,
    "mlmdm-256": 256,
    "mlmdm-1024": 1024,
    "tiny-video": 16,
    "emoji-video": 32,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="emoji64", choices=sorted(DEFAULT_RESOLUTION))
    parser.add_argument("--resolution", type=int, help="top-level side (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument(
        "--unfused-adamw", action="store_true", help="AdamW's per-tensor loop (the trainer fuses it, except under FSDP)"
    )
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--mixed-ratio", type=float, help="mixed-resolution batch fraction for the top level")
    parser.add_argument("--channels-last", action="store_true", help="channels-last weights (train.channels_last)")
    parser.add_argument(
        "--flops", action="store_true", help="also count the forward FLOPs of the loss per image (torch's counter)"
    )
    parser.add_argument(
        "--set",
        nargs="*",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="model config overrides, e.g. levels.1.channels=[32,64,64]",
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    config = from_dict(ModelConfig, apply_overrides(to_dict(model_preset(args.preset)), args.set, ModelConfig))
    config.gradient_checkpointing = args.checkpointing
    resolution = args.resolution or DEFAULT_RESOLUTION[args.preset]
    model = NestedUNet(config).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    network = torch.compile(model) if args.compile else model
    process = MatryoshkaDiffusion(
        make_schedule("squaredcos"),
        num_levels=config.num_levels,
        factor=max(2, config.nest_ratio),
        mixed_ratio=args.mixed_ratio,
        frames=config.frames[::-1] or None,
        self_condition=config.self_condition,  # its extra pass is part of the step
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=not args.unfused_adamw)  # as the trainer
    # a video model trains on clips (B, C, F, H, W) of its top level's frame count
    clip = config.frames[-1:] if config.is_video else []
    shape = (args.batch_size, config.in_channels, *clip, resolution, resolution)
    images = torch.randn(*shape, device=device).clamp(-1, 1)
    cond = None
    if config.text_dim:
        cond = Conditioning(text=torch.randn(args.batch_size, 77, config.text_dim, device=device))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()

    def step() -> None:
        with autocast:
            loss, _ = process.loss(network, images, cond)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    forward_flops = None
    if args.flops:
        with FlopCounterMode(display=False) as counter, torch.no_grad(), autocast:
            process.loss(model, images, cond)
        forward_flops = counter.get_total_flops() / args.batch_size
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    print(
        json.dumps(
            {
                "preset": args.preset,
                "resolution": resolution,
                "levels": config.num_levels,
                "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                "batch_size": args.batch_size,
                "device": torch.cuda.get_device_name()
                if device.type == "cuda"
                else f"cpu ({torch.get_num_threads()} threads)",
                "bf16": args.bf16,
                "channels_last": args.channels_last,
                "overrides": args.set,
                "checkpointing": args.checkpointing,
                "compile": args.compile,
                "fused_adamw": not args.unfused_adamw,
                "images_per_s": round(args.batch_size * args.steps / elapsed, 2),
                **({"frames_per_s": round(args.batch_size * clip[0] * args.steps / elapsed, 2)} if clip else {}),
                "step_s": round(elapsed / args.steps, 4),
                **({"forward_gflop_per_image": round(forward_flops / 1e9, 1)} if forward_flops else {}),
                "peak_memory_GiB": round(peak, 3),
                "peak_memory_kind": "cuda allocated" if device.type == "cuda" else "process max RSS",
            }
        )
    )


if __name__ == "__main__":
    main()
