"""``mdm train``: train a model, resume a run, or launch itself under torchrun."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config.presets import DEFAULT_PRESET, load_run_config
from ..config.run import RunConfig
from .errors import UserError


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
        return load_run_config(saved, [*overrides, f"run_dir={resume}"]), True
    config = load_run_config(source, overrides)
    saved = Path(config.run_dir).expanduser() / "config.yaml"
    if saved.is_file():
        return load_run_config(saved, overrides), True
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
          f"on {len(trainer.dataset)} {f'clips of {config.data.frames} frames' if config.data.frames else 'images'} "
          f"at {config.data.resolution}px, {trainer.total_steps} steps{stages}, device {trainer.device}")
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


def add_parser(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train a model (resumes an existing run directory)")
    train.add_argument("config", nargs="?", help=f"preset name or YAML file (default: {DEFAULT_PRESET})")
    train.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides, e.g. train.steps=2000")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue this run directory")
    train.add_argument("--nproc", type=int, help="launch torchrun with this many processes per node")
    train.add_argument("--torchrun-args", dest="torchrun_args", default=[], type=str.split,
                       help='extra torchrun flags for multi-node runs, e.g. "--nnodes=2 --node_rank=0 --rdzv_endpoint=host:29500"')
    train.set_defaults(func=cmd_train)
