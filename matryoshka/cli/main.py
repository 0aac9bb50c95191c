"""The ``mdm`` command line: train, sample, presets, data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import load_config
from ..config.presets import RUN_PRESETS, describe_presets
from ..config.run import RunConfig

DEFAULT_PRESET = "emoji64"


class UserError(Exception):
    """A problem with the user's input: printed as one clear line, exit status 2."""


# ---------------------------------------------------------------------- train
def resolve_train_config(source: str | None, overrides: list[str], resume: str | None) -> tuple[RunConfig, bool]:
    """The run's configuration, and whether it continues an existing run directory.

    An existing run directory (``--resume`` or the ``run_dir`` of the config) is resumed
    with its saved ``config.yaml``; overrides still apply, e.g. ``train.steps=5000``
    to train longer.
    """
    if resume:
        saved = Path(resume).expanduser() / "config.yaml"
        if not saved.is_file():
            raise UserError(f"--resume {resume}: no config.yaml there (is it a run directory?)")
        return load_config(RunConfig, saved, [*overrides, f"run_dir={resume}"]), True
    config = load_config(RunConfig, source or DEFAULT_PRESET, overrides, RUN_PRESETS)
    saved = Path(config.run_dir).expanduser() / "config.yaml"
    if saved.is_file():
        return load_config(RunConfig, saved, overrides), True
    return config, False


def launch_torchrun(args: argparse.Namespace) -> int:
    """``mdm train --nproc N ...``: re-run this command under torchrun with N processes per node."""
    import subprocess

    forwarded, skip_next = [], False
    for arg in args.raw_argv:
        if skip_next:
            skip_next = False
        elif arg in ("--nproc", "--torchrun-args"):
            skip_next = True
        elif not arg.startswith(("--nproc=", "--torchrun-args=")):
            forwarded.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", *args.torchrun_args,
               "-m", "matryoshka.cli", *forwarded]
    print("launching: " + " ".join(command), flush=True)
    return subprocess.call(command)


def cmd_train(args: argparse.Namespace) -> int:
    from ..training.distributed import init_distributed, shutdown_distributed

    if args.nproc:
        return launch_torchrun(args)
    source, overrides = args.config, list(args.overrides)
    if source is not None and "=" in source:  # `mdm train key=value` without a CONFIG
        source, overrides = None, [source, *overrides]
    config, resuming = resolve_train_config(source, overrides, args.resume)
    dist = init_distributed(config.train.device)
    try:
        return _train(config, resuming, dist)
    finally:
        shutdown_distributed()


def _train(config: RunConfig, resuming: bool, dist) -> int:
    from ..training.trainer import Trainer, TrainingStopped

    trainer = Trainer(config, dist)
    run_dir = trainer.run_dir
    say = print if dist.is_main else (lambda *a, **k: None)
    if dist.enabled:
        say(f"{dist.world_size} processes ({config.train.strategy}); global batch {trainer.global_batch()}")
    if trainer.resumed_from is not None:
        say(f"resuming {run_dir} from step {trainer.step} ({trainer.resumed_from.name})")
    elif resuming:
        say(f"{run_dir} has a config but no checkpoint yet: starting from step 0")
    stages = "" if len(trainer.stages) == 1 else f" in {len(trainer.stages)} stages"
    say(f"training {trainer.num_levels}-level model ({sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f}M parameters) "
          f"on {len(trainer.dataset)} images at {config.data.resolution}px, {trainer.total_steps} steps{stages}, device {trainer.device}")
    report = getattr(trainer.dataset, "skip_report", None)
    if report is not None:
        say(report())
    try:
        checkpoint = trainer.train()
    except TrainingStopped as stop:
        say(f"{stop} (checkpoint: {stop.checkpoint})", file=sys.stderr)
        return stop.exit_code
    samples = sorted((run_dir / "samples").glob(f"step_{trainer.step:08d}_*.png"))
    say(f"done: {trainer.step} steps. run: {run_dir}  checkpoint: {checkpoint}  samples: {', '.join(str(p) for p in samples)}")
    return 0


# ---------------------------------------------------------------------- sample
def cmd_sample(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..pipeline import load_pipeline
    from ..utils.images import save_grid, save_images

    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file).expanduser()
        if not path.is_file():
            raise UserError(f"--prompt-file {path}: no such file")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    pipe = load_pipeline(args.run, use_ema=args.ema, device=args.device)
    if prompts and not pipe.model.config.text_dim:
        raise UserError("this model has no text conditioning; --prompt needs a text-to-image model")
    if pipe.model.config.text_dim and not prompts:
        raise UserError("this is a text-to-image model: give --prompt TEXT (or --prompt-file FILE)")
    # With prompts, --num images per prompt, one grid row per prompt.
    total = args.num * max(1, len(prompts))
    per_sample_prompts = [p for p in prompts for _ in range(args.num)] or None
    labels = [_class_index(pipe, args.class_label)] if args.class_label is not None else None
    cond = pipe.condition(total, labels, per_sample_prompts)
    uncond = None
    if args.negative_prompt is not None:
        negative = pipe.encode([args.negative_prompt] * total)
        uncond = cond.unconditional()
        uncond.text, uncond.text_mask = negative.text, negative.text_mask
    steps = args.steps or pipe.config.sample.steps
    bar = tqdm(total=steps, desc="sampling", unit="step")
    options = {"spacing": args.spacing} if args.spacing else {}
    levels = pipe.generate(num=total, sampler=args.sampler, steps=steps, guidance=args.guidance, cond=cond,
                           uncond=uncond, seed=args.seed, callback=lambda *_: bar.update(1), **options)
    bar.close()
    out = Path(args.out or (pipe.checkpoint.parent.parent / "samples" / f"sample_{pipe.step:08d}")).expanduser()
    columns = args.num if prompts else None
    for level in levels:
        side = level.shape[-1]
        save_images(level, out / f"{side}px", prefix="")
        save_grid(level, out / f"grid_{side}px.png", columns=columns)
    if prompts:
        (out / "prompts.txt").write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    print(f"wrote {total} samples at {', '.join(f'{level.shape[-1]}px' for level in levels)} to {out} "
          f"(grids: {', '.join(str(out / f'grid_{level.shape[-1]}px.png') for level in levels)})")
    return 0


def _class_index(pipe, label: str) -> int:
    if label.lstrip("-").isdigit():
        return int(label)
    from ..data import build_dataset

    names = list(getattr(build_dataset(pipe.config.data), "class_names", []))
    if label in names:
        return names.index(label)
    raise UserError(f"unknown class '{label}'; classes: {', '.join(names) or '(none)'}")


# ---------------------------------------------------------------------- presets, data
def cmd_presets(_args: argparse.Namespace) -> int:
    width = max(len(name) for name, _ in describe_presets())
    for name, summary in describe_presets():
        print(f"{name:<{width}}  {summary}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from ..data.emoji import export_emoji

    summary = export_emoji(args.out, size=args.size, label=args.label)
    print(f"exported {summary['count']} emoji images in {len(summary['class_names'])} classes to {args.out} "
          f"(class folders, caption .txt sidecars and metadata.jsonl; use data.source=imagefolder data.path={args.out})")
    return 0


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdm", description="Matryoshka Diffusion Models: train and sample.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model (resumes an existing run directory)")
    train.add_argument("config", nargs="?", help=f"preset name or YAML file (default: {DEFAULT_PRESET})")
    train.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides, e.g. train.steps=2000")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue this run directory")
    train.add_argument("--nproc", type=int, help="launch torchrun with this many processes per node")
    train.add_argument("--torchrun-args", dest="torchrun_args", default=[], type=str.split,
                       help='extra torchrun flags for multi-node runs, e.g. "--nnodes=2 --node_rank=0 --rdzv_endpoint=host:29500"')
    train.set_defaults(func=cmd_train)

    sample = commands.add_parser("sample", help="sample images from a run or checkpoint")
    sample.add_argument("run", help="run directory or checkpoint directory")
    sample.add_argument("--num", type=int, default=16, help="images (per prompt, with prompts)")
    sample.add_argument("--steps", type=int)
    sample.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++2m"])
    sample.add_argument("--spacing", choices=["trailing", "mlmdm"], help="time steps (default: the run's sample.spacing)")
    sample.add_argument("--guidance", type=float)
    sample.add_argument("--class", dest="class_label", help="class index or name")
    sample.add_argument("--prompt", action="append", help="text prompt (repeat for several; one grid row each)")
    sample.add_argument("--prompt-file", dest="prompt_file", help="file with one prompt per line")
    sample.add_argument("--negative-prompt", dest="negative_prompt", help="prompt for the unconditional branch of guidance")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", help="output directory (default: RUN/samples/sample_STEP)")
    sample.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights")
    sample.add_argument("--device", default="auto")
    sample.set_defaults(func=cmd_sample)

    presets = commands.add_parser("presets", help="list the presets")
    presets.set_defaults(func=cmd_presets)

    data = commands.add_parser("data", help="export a built-in dataset")
    data.add_argument("name", choices=["emoji"])
    data.add_argument("--out", required=True)
    data.add_argument("--size", type=int, default=64)
    data.add_argument("--label", default="group", choices=["none", "group", "subgroup"])
    data.set_defaults(func=cmd_data)

    from .convert import add_parser as add_convert_parser
    from .evaluate import add_parsers as add_eval_parsers
    from .serve import add_parser as add_serve_parser

    add_convert_parser(commands)
    add_eval_parsers(commands)
    add_serve_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides may come after options such as --nproc
        if getattr(args, "overrides", None) is None or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    args.raw_argv = argv
    from ..data import EmptyDatasetError
    from ..training.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (UserError, ValueError, CheckpointError, FileNotFoundError, EmptyDatasetError) as error:
        print(f"mdm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
