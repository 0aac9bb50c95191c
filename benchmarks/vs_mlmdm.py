"""Training-step throughput of Apple's ml-mdm NestedUNet vs ours, same architecture and batch, on the CPU.

    git --git-dir=<fetched ml-mdm mirror> archive HEAD | tar -x -C /tmp/ml-mdm   # checkout of github.com/apple/ml-mdm
    pip install -c constraints.txt einops                                      # ml-mdm's loss needs it
    python benchmarks/vs_mlmdm.py --mlmdm-src /tmp/ml-mdm                      # emoji64, batch 16
    python benchmarks/vs_mlmdm.py --mlmdm-src /tmp/ml-mdm --precision fp32     # both fp32: the code alone
    OMP_NUM_THREADS=1 python benchmarks/vs_mlmdm.py --mlmdm-src /tmp/ml-mdm --batch-size 2 --steps 1 --warmup 1

``--mlmdm-src`` is the directory holding the ``ml_mdm`` package (or the repository's root:
its ``ml-mdm-matryoshka/`` is then used). Nothing of ml-mdm is copied into this repository.

Both sides time full optimizer steps (forward, diffusion loss on every level, backward,
AdamW) on the same random images after warm-up steps. ml-mdm's side is its own training
path: ``ml_mdm.diffusion.NestedDiffusion.get_loss`` (``Diffusion`` for one level) and the
reduction of ``ml_mdm.trainer.train_batch`` (``losses.mean()``), configured as its released
models (DEEPFLOYD schedule shifted per level, v-prediction, eps loss target, loss on every
level, no VDM weights, no residual), in fp32: ml-mdm's ``--fp16`` is ``torch.cuda.amp`` autocast,
which does nothing on a CPU. Ours runs at ``--precision`` as ``mdm train`` resolves ``train.precision``
(auto: bf16 autocast where the CPU has native bf16 and it pays). Ours is ``MatryoshkaDiffusion.loss`` as in
benchmarks/train_throughput.py. The ml-mdm network is built from our preset by mapping each
level to ml-mdm's UNetConfig/NestedUNetConfig; the mapping is checked name-by-name and
shape-by-shape with our converter (``map_mlmdm_keys``) and our model starts from ml-mdm's
initial weights. ml-mdm always uses 8 attention heads, so ours is set to 8 too (the preset's
count is reported; parameters are the same either way). ml-mdm's loss path does some work
ours does not (per-level gamma maps interpolated from full-size ones, noise pooled and then
redrawn); it is part of ml-mdm's training step, so it is timed. ml-mdm runs first, then ours,
each with its own warm-up. Prints one JSON line per implementation and one with the ratio
(ours / ml-mdm, images/s).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import time
import types
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from matryoshka.diffusion.process import MatryoshkaDiffusion
from matryoshka.diffusion.schedules import make_schedule
from matryoshka.interop.mlmdm import convert_state_dict
from matryoshka.models import MODEL_PRESETS, Conditioning, ModelConfig, NestedUNet, model_preset
from matryoshka.training.precision import use_bf16

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import DEFAULT_RESOLUTION

MLMDM_HEADS = 8  # ml-mdm's SelfAttention is always built with its default num_heads=8
TEXT_TOKENS = 77


def import_mlmdm(src: Path) -> types.SimpleNamespace:
    """Import ml-mdm's model, diffusion and sampler modules, stubbing what they import but never run."""
    if not (src / "ml_mdm").is_dir() and (src / "ml-mdm-matryoshka" / "ml_mdm").is_dir():
        src = src / "ml-mdm-matryoshka"  # the repository root was given
    if not (src / "ml_mdm").is_dir():
        raise SystemExit(f"--mlmdm-src: no ml_mdm package in {src}")
    sys.path.insert(0, str(src))

    def stub(name: str, **attrs: object) -> None:
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module

    def no_op_decorator(*_: object) -> Callable:
        return lambda cls: cls

    # ml_mdm.config only registers classes by name for its CLI, but imports simple_parsing and
    # ml_mdm.reader (mlx-data, transformers): keep just the registering decorators.
    stub(
        "ml_mdm.config",
        **{
            name: no_op_decorator
            for name in ("register_model_config", "register_model", "register_pipeline_config", "register_pipeline")
        },
    )
    # Used by UNet.load / ModelEma to unpickle old checkpoints; it imports all of ml-mdm (mlx, T5).
    stub("ml_mdm.utils.fix_old_checkpoints", mimic_old_modules=lambda: None)
    # Only downloads a pretrained inner UNet from S3 (initialize_inner_with_pretrained); imports boto3.
    stub("ml_mdm.s3_helpers", download_object_from_full_path=None)
    if importlib.util.find_spec("torchinfo") is None:
        stub("torchinfo", summary=None)  # only UNet.print_size calls it
    if importlib.util.find_spec("torchvision") is None:
        stub("torchvision")  # ml_mdm.diffusion imports save_image for a debugging helper (sv)
        stub("torchvision.utils", save_image=None)
    if importlib.util.find_spec("einops") is None:
        raise SystemExit("ml-mdm's sampler needs einops: pip install -c constraints.txt einops")
    from ml_mdm import diffusion, samplers
    from ml_mdm.models import nested_unet, unet

    return types.SimpleNamespace(diffusion=diffusion, samplers=samplers, unet=unet, nested=nested_unet)


def mlmdm_unet_config(m: types.SimpleNamespace, config: ModelConfig) -> object:
    """ml-mdm's (Nested)UNetConfig for our model config (the inverse of matryoshka.interop.mlmdm)."""
    if config.num_classes:
        raise SystemExit("ml-mdm has no class-conditional UNet")
    section = None
    for index, level in enumerate(config.levels):  # innermost first
        innermost = index == 0
        attends = any(level.stage_attention_layers(s) for s in range(len(level.channels))) or innermost
        if attends and level.attention_groups != 32:
            raise SystemExit(
                f"level {index}: ml-mdm's attention always uses 32 norm groups, this level uses "
                f"{level.attention_groups}"
            )
        if innermost and (not level.mid_attention or level.normalize_input):
            raise SystemExit("ml-mdm's innermost UNet always has mid attention and never normalizes its input")
        options = dict(
            num_resnets_per_resolution=list(level.res_blocks),
            temporal_dim=config.embed_dim,
            attention_levels=list(level.attention_stages),
            num_attention_layers=list(level.attention_layers),
            resolution_channels=list(level.channels),
            nesting=index < config.num_levels - 1,
            micro_conditioning=",".join(f"{k}:{v:g}" for k, v in level.micro_conditioning.items()) or None,
            resnet_config=m.unet.ResNetConfig(
                num_groups_norm=level.norm_groups, dropout=level.dropout, use_attention_ffn=level.attention_ffn
            ),
        )
        if innermost:
            # The innermost UNet owns the text path: projection, pooled embedding, masking.
            options.update(
                conditioning_feature_proj_dim=config.text_proj_dim or -1,
                masked_cross_attention=int(config.text_attention_mask),
            )
            section = m.unet.UNetConfig(**options)
        else:
            section = m.nested.NestedUNetConfig(
                **options, inner_config=section, skip_normalization=not level.normalize_input
            )
    # ml-mdm's CLIs set the text width on the outermost config; it is handed inward.
    section.conditioning_feature_dim = config.text_dim or -1
    return section


def build_mlmdm(m: types.SimpleNamespace, config: ModelConfig) -> tuple[torch.nn.Module, object]:
    """(vision model, diffusion pipeline) configured like ml-mdm's released models."""
    unet_config = mlmdm_unet_config(m, config)
    S = m.samplers
    sampler = S.SamplerConfig(
        num_diffusion_steps=1000,
        schedule_type=S.ScheduleType.DEEPFLOYD,
        prediction_type=S.PredictionType.V_PREDICTION,
        loss_target_type=S.PredictionType.DDPM,
        schedule_shifted=True,
    )
    if config.num_levels == 1:
        vision = m.unet.UNet(config.in_channels, config.out_channels, unet_config)
        pipeline = m.diffusion.Diffusion(
            vision, m.diffusion.DiffusionConfig(sampler_config=sampler, use_vdm_loss_weights=False)
        )
    else:
        vision = m.nested.NestedUNet(config.in_channels, config.out_channels, unet_config)
        pipeline = m.diffusion.NestedDiffusion(
            vision,
            m.diffusion.NestedDiffusionConfig(
                sampler_config=sampler, use_vdm_loss_weights=False, use_double_loss=True, no_use_residual=True
            ),
        )
    return vision, pipeline


def time_steps(step: Callable[[], float], warmup: int, steps: int) -> tuple[float, float]:
    """(seconds per step, last loss) over ``steps`` timed steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    loss = float("nan")
    for _ in range(steps):
        loss = step()
    return (time.perf_counter() - start) / steps, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mlmdm-src", type=Path, required=True, help="directory holding the ml_mdm package")
    parser.add_argument("--preset", default="emoji64", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format (ours only)")
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="ours: train.precision, resolved as mdm train does (auto: bf16 where this CPU runs it natively)",
    )
    parser.add_argument(
        "--mlmdm-precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="ml-mdm: fp32 is how it trains on a CPU (its --fp16 is torch.cuda.amp autocast, a no-op there); "
        "bf16 wraps its step in CPU autocast, which ml-mdm itself cannot do",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    m = import_mlmdm(args.mlmdm_src.expanduser().resolve())
    config = model_preset(args.preset)
    preset_heads = sorted(
        {lv.attention_heads for lv in config.levels[:1] + [lv for lv in config.levels if lv.attention_stages]}
    )
    config = dataclasses.replace(
        config, levels=[dataclasses.replace(lv, attention_heads=MLMDM_HEADS) for lv in config.levels]
    )
    resolution = DEFAULT_RESOLUTION[args.preset]
    torch.manual_seed(args.seed)

    vision, pipeline = build_mlmdm(m, config)
    ours = NestedUNet(config)
    # Checks every parameter name and shape against ours, and starts both from the same weights.
    ours.load_state_dict(convert_state_dict(vision.state_dict(), config, "ml-mdm's model"))
    count = {"ml-mdm": sum(p.numel() for p in vision.parameters()), "ours": sum(p.numel() for p in ours.parameters())}

    images = torch.randn(args.batch_size, config.in_channels, resolution, resolution).clamp(-1, 1)
    text = torch.randn(args.batch_size, TEXT_TOKENS, config.text_dim) if config.text_dim else None
    # ml-mdm's NestedUNet slices its conditioning (conditioning[:bh]) even when it has none: give
    # an unconditional model a dummy tensor, which nothing else reads.
    sample = {
        "images": images,
        "lm_outputs": text if text is not None else torch.zeros(args.batch_size, 1, 1),
        "lm_mask": torch.ones(args.batch_size, TEXT_TOKENS) if text is not None else None,
    }
    cond = Conditioning(text=text) if text is not None else None
    process = MatryoshkaDiffusion(
        make_schedule("squaredcos"), num_levels=config.num_levels, factor=max(2, config.nest_ratio)
    )
    ours_images = images.contiguous(memory_format=torch.channels_last) if args.channels_last else images
    if args.channels_last:
        ours = ours.to(memory_format=torch.channels_last)
    bf16 = {"ml-mdm": args.mlmdm_precision == "bf16", "ours": use_bf16(args.precision, torch.device("cpu"))}

    def trainer(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], bf16: bool) -> Callable[[], float]:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()

        def step() -> float:
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
                loss = loss_fn()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        return step

    def mlmdm_loss() -> torch.Tensor:
        losses = pipeline.get_loss(sample)[0]
        return losses.mean()  # ml_mdm.trainer.train_batch with use_vdm_loss_weights=False

    runs = {
        "ml-mdm": trainer(vision, mlmdm_loss, bf16["ml-mdm"]),
        "ours": trainer(ours, lambda: process.loss(ours, ours_images, cond)[0], bf16["ours"]),
    }
    throughput = {}
    for name, step in runs.items():
        step_s, loss = time_steps(step, args.warmup, args.steps)
        throughput[name] = args.batch_size / step_s
        print(
            json.dumps(
                {
                    "implementation": name,
                    "preset": args.preset,
                    "resolution": resolution,
                    "levels": config.num_levels,
                    "parameters": count[name],
                    "batch_size": args.batch_size,
                    "device": f"cpu ({torch.get_num_threads()} threads)",
                    "bf16": bf16[name],
                    "channels_last": args.channels_last and name == "ours",
                    "images_per_s": round(throughput[name], 3),
                    "step_s": round(step_s, 4),
                    "last_loss": round(loss, 5),
                }
            ),
            flush=True,
        )
    print(
        json.dumps(
            {
                "ratio_ours_over_mlmdm": round(throughput["ours"] / throughput["ml-mdm"], 3),
                "same_parameter_count": count["ours"] == count["ml-mdm"],
                "parameter_difference": count["ours"] - count["ml-mdm"],
                "attention_heads": f"{MLMDM_HEADS} on both (ml-mdm's fixed count; preset: {preset_heads})",
            }
        )
    )


if __name__ == "__main__":
    main()
