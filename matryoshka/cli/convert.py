"""``mdm convert``: turn other implementations' checkpoints into ours.

mdm convert mlmdm --checkpoint vis_model.pth --config cc12m_256x256.yaml --out converted/mlmdm-256
mdm convert diffusers-mdm --model matryoshka-diffusion-models/unet/nesting_level_1 --out converted/port-256
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``convert`` (with its ``mlmdm`` source) on the ``mdm`` sub-command parsers."""
    convert = subparsers.add_parser(
        "convert",
        help="convert a checkpoint of another implementation (Apple ml-mdm, the diffusers port) into ours",
        description="Convert a checkpoint of another implementation into our checkpoint format.",
    )
    sources = convert.add_subparsers(dest="source", required=True, metavar="SOURCE")
    mlmdm = sources.add_parser(
        "mlmdm",
        help="Apple ml-mdm vis_model.pth + its YAML config",
        description=(
            "Convert an Apple ml-mdm checkpoint (vis_model.pth, a plain state dict, or a safetensors file with "
            "ml-mdm's parameter names) and its YAML config (configs/models/cc12m_*.yaml) into a checkpoint "
            "directory that `mdm sample`, `mdm train init_from=...` and load_pipeline() accept. The .pth is read "
            "without running code from it. See docs/mlmdm.md."
        ),
    )
    mlmdm.add_argument(
        "--checkpoint", required=True, metavar="FILE", help="vis_model.pth (or a state dict / safetensors file)"
    )
    mlmdm.add_argument(
        "--config",
        metavar="YAML",
        help="ml-mdm model config, e.g. cc12m_256x256.yaml (default: the training arguments saved in the checkpoint)",
    )
    mlmdm.add_argument(
        "--out", required=True, metavar="DIR", help="output checkpoint directory (must not exist or be empty)"
    )
    mlmdm.add_argument(
        "--state-dict-only",
        action="store_true",
        help="write only the converted weights (model.safetensors) and config.yaml, not a full checkpoint",
    )
    mlmdm.add_argument(
        "--text-dim",
        type=int,
        metavar="N",
        help="token width of the text encoder (default: the checkpoint's, else the config's text_model's)",
    )
    mlmdm.add_argument("--resolution", type=int, metavar="PX", help="top-level image size, if the config gives none")
    mlmdm.add_argument(
        "--ignore-training-options",
        action="store_true",
        help="convert even when ml-mdm training options (loss weighting, freezing) cannot be reproduced by our trainer",
    )
    mlmdm.set_defaults(func=cmd_convert_mlmdm)
    port = sources.add_parser(
        "diffusers-mdm",
        help="the diffusers community pipeline's Matryoshka UNet (one nesting level: config.json + weights)",
        description=(
            "Convert one nesting level of the diffusers community port of Matryoshka Diffusion Models "
            "(examples/community/matryoshka.py; e.g. unet/nesting_level_1/ with config.json and "
            "diffusion_pytorch_model.safetensors or .bin) into our checkpoint directory. Weights are read without "
            "running code. See docs/mlmdm.md."
        ),
    )
    port.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="the nesting level's directory (or its weight file, next to its config.json)",
    )
    port.add_argument(
        "--out", required=True, metavar="DIR", help="output checkpoint directory (must not exist or be empty)"
    )
    port.add_argument(
        "--resolution", type=int, metavar="PX", help="top-level image size (default: 64 at the innermost level)"
    )
    port.set_defaults(func=cmd_convert_diffusers_mdm)
    return convert


def cmd_convert_mlmdm(args: argparse.Namespace) -> int:
    from ..interop.mlmdm import convert_mlmdm

    result = convert_mlmdm(
        args.checkpoint,
        args.config,
        args.out,
        state_dict_only=args.state_dict_only,
        text_dim=args.text_dim,
        resolution=args.resolution,
        strict_training=not args.ignore_training_options,
    )
    config = result.config
    sides = config.model.level_sides(config.data.resolution)
    print(
        f"converted {args.checkpoint} ({config.model.num_levels} level(s): {' > '.join(f'{s}px' for s in sides)}, "
        f"{result.num_parameters / 1e6:.1f}M parameters, ml-mdm step {result.step}) to {result.out}: "
        + ", ".join(result.files)
    )
    for note in result.notes:
        print(f"  note: {note}")
    sampling = result.sampling
    print(
        f"  ml-mdm sampling: {sampling['sampler']} eta={sampling['eta']}, {sampling['steps']} steps, guidance "
        f"{sampling['guidance']}, threshold {sampling['threshold_function'].lower()} (recorded in "
        f"state.pt; see docs/mlmdm.md)"
    )
    return 0


def cmd_convert_diffusers_mdm(args: argparse.Namespace) -> int:
    from ..interop.diffusers_mdm import convert_diffusers_mdm

    result = convert_diffusers_mdm(args.model, args.out, resolution=args.resolution)
    config = result.config
    sides = config.model.level_sides(config.data.resolution)
    print(
        f"converted {args.model} ({config.model.num_levels} level(s): {' > '.join(f'{s}px' for s in sides)}, "
        f"{result.num_parameters / 1e6:.1f}M parameters) to {result.out}: " + ", ".join(result.files)
    )
    for note in result.notes:
        print(f"  note: {note}")
    return 0
