"""``mdm train``: train a model, resume a run, or launch itself under torchrun."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoints import checkpoint_step
from ..config import deep_merge, load_config, load_yaml, to_dict
from ..config.errors import short
from ..config.presets import DEFAULT_PRESET, RUN_PRESETS, load_run_config
from ..config.run import RunConfig, upgrade_run_data
from .errors import UserError

if TYPE_CHECKING:
    from ..training.lock import RunLock


def describe_size(dataset, frames: int = 0) -> str:
    if getattr(dataset, "streaming", False):  # a stream is only counted as it is read
        return f"{len(dataset.urls)} streamed shards"
    return f"{len(dataset)} clips of {frames} frames" if frames else f"{len(dataset)} images"


FIXED_IN_A_RUN = (
    "model",
    "diffusion",
    "data.resolution",
    "data.label",
    "data.captions",
    "data.colour_captions",
    "text.encoder",
    "text.max_length",
    "text.mlmdm_compat",
    "stages",
)
"""Settings the saved weights, optimizer state or stage history depend on: an existing run keeps them."""


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _changes(requested: RunConfig, saved: RunConfig) -> tuple[list[str], list[str]]:
    """Lines ``key: saved -> requested`` for every differing setting, and those of them that cannot change."""
    new, old = _flatten(to_dict(requested)), _flatten(to_dict(saved))
    changed = [key for key in sorted(set(new) | set(old)) if key != "run_dir" and new.get(key) != old.get(key)]
    lines = [f"{key}: {short(old.get(key), 40)} -> {short(new.get(key), 40)}" for key in changed]
    fixed = [
        line
        for key, line in zip(changed, lines, strict=True)
        if key.split(".")[0] in FIXED_IN_A_RUN or key in FIXED_IN_A_RUN
    ]
    return lines, fixed


def _refuse_fixed(fixed: list[str], run: Path) -> None:
    if fixed:
        raise UserError(
            f"the run in {run} was made with other settings that cannot change in an existing run "
            f"({'; '.join(fixed)}, saved -> requested). Use a new run_dir (init_from={run} starts it from this run's "
            f"weights), or continue with the saved settings: mdm train --resume {run} [train.steps=N ...]"
        )


def _run_of(resume: str) -> tuple[Path, Path | None]:
    """``--resume``'s run directory, and the checkpoint to go back to when it names one."""
    path = Path(resume).expanduser()
    if not path.exists():
        raise UserError(f"--resume {resume}: no such run directory")
    if path.name == "latest" and path.parent.name == "checkpoints":
        return path.parent.parent, None  # the pointer means the newest checkpoint, like the run itself
    if path.is_dir() and path.name == "checkpoints":
        return path.parent, None
    if path.is_dir() and (path / "state.pt").is_file():
        if path.parent.name != "checkpoints" or checkpoint_step(path) is None:
            raise UserError(
                f"--resume {resume} is a checkpoint outside a run's checkpoints/ folder; to train a new run from its "
                f"weights, use init_from={resume}"
            )
        return path.parent.parent, path
    if not (path / "config.yaml").is_file():
        raise UserError(f"--resume {resume}: no config.yaml there (is it a run directory?)")
    return path, None


def resolve_train_config(
    source: str | None, overrides: list[str], resume: str | None
) -> tuple[RunConfig, bool, Path | None, list[str]]:
    """The run's configuration, whether it continues an existing run, the checkpoint to go back to, and notes.

    An existing run directory (``--resume`` or the ``run_dir`` of the config) continues with
    its saved ``config.yaml``; overrides, or a CONFIG given again, may change what can change
    in a running run (steps, learning rate, time limit, sampling, evaluation, data location...),
    and each change is listed. ``--resume RUN/checkpoints/step_N`` goes back to that checkpoint.
    """
    checkpoint = None
    if resume:
        run, checkpoint = _run_of(resume)
    else:
        run = Path(load_run_config(source, overrides).run_dir).expanduser()
    saved = run / "config.yaml"
    if not saved.is_file() and checkpoint is not None:
        saved = checkpoint / "config.yaml"
    if not saved.is_file():
        return load_run_config(source, overrides), False, None, []
    overrides = [*overrides, f"run_dir={run}"]
    stored = load_run_config(saved, [f"run_dir={run}"])
    if source:
        # A CONFIG given again must describe the same model (e.g. not another preset's) ...
        _refuse_fixed(_changes(load_run_config(source, overrides), stored)[1], run)
        # ... and what it sets itself applies: the keys written in a YAML file (a preset name sets none: a
        # setting given as an override when the run began is not undone by leaving it out now).
        explicit = {} if source in RUN_PRESETS else load_yaml(source)
        explicit.pop("preset", None)
        base: Any = deep_merge(to_dict(stored), explicit)
    else:
        base = saved
    config = load_config(RunConfig, base, overrides, RUN_PRESETS, upgrade=upgrade_run_data)
    changes, fixed = _changes(config, stored)
    _refuse_fixed(fixed, run)
    notes = [f"settings changed from the saved {saved}, applied: " + ", ".join(changes)] if changes else []
    return config, True, checkpoint, notes


def check_run_dir(run: Path) -> None:
    """A run directory this process can create and write in, or a one-line UserError."""
    if run.exists() and not run.is_dir():
        raise UserError(f"run_dir {run} is a file, not a directory")
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create run_dir {run}: {error.strerror or error}") from None
    if not os.access(run, os.W_OK | os.X_OK):
        raise UserError(f"cannot write in run_dir {run}: permission denied or a read-only filesystem")


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
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={args.nproc}",
        *args.torchrun_args,
        "-m",
        "matryoshka.cli",
        *forwarded,
    ]
    print("launching: " + " ".join(command), flush=True)
    return subprocess.call(command)


def cmd_train(args: argparse.Namespace) -> int:
    from ..training.distributed import init_distributed, shutdown_distributed

    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: the number of processes must be at least 1")
    source, overrides = args.config, list(args.overrides)
    if source is not None and "=" in source:  # `mdm train key=value` without a CONFIG
        source, overrides = None, [source, *overrides]
    config, resuming, checkpoint, notes = resolve_train_config(source, overrides, args.resume)
    if args.nproc:  # the configuration is checked above, once, rather than by every process
        return launch_torchrun(args)
    dist = init_distributed(config.train.device)
    try:
        dist.device(config.train.device)  # a device missing here is refused before the run directory is touched
        with _run_lock(Path(config.run_dir).expanduser(), dist) as lock:
            say = print if dist.is_main else (lambda *a, **k: None)
            for line in filter(None, [lock.stale_message() if lock else None, *notes]):
                say(line)
            return _train(config, resuming, checkpoint, dist)
    finally:
        shutdown_distributed()


@contextmanager
def _run_lock(run: Path, dist) -> Iterator[RunLock | None]:
    """Rank 0 locks the run directory; every rank stops with its message if that fails."""
    from ..training.lock import RunLock

    lock, refusal = None, None
    if dist.is_main:
        try:
            check_run_dir(run)
            lock = RunLock(run).acquire()
        except (UserError, OSError) as error:  # e.g. RUN/.lock made a folder: refused, not a hang of the others
            refusal = str(error)
    refusal = dist.from_main(refusal)  # the other ranks wait here for rank 0's verdict
    if refusal:
        raise UserError(refusal)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def _train(config: RunConfig, resuming: bool, checkpoint: Path | None, dist) -> int:
    import torch

    from ..training.trainer import Trainer, TrainingStopped

    try:
        trainer = Trainer(config, dist, resume_from=checkpoint)
    except (NotADirectoryError, PermissionError) as error:
        raise UserError(str(error)) from None
    run_dir = trainer.run_dir
    say = print if dist.is_main else (lambda *a, **k: None)
    for note in trainer.notes:
        say(note)
    if dist.enabled:
        say(f"{dist.world_size} processes ({config.train.strategy}); global batch {trainer.global_batch()}")
    if trainer.resumed_from is not None:
        say(f"resuming {run_dir} from step {trainer.step} ({trainer.resumed_from.name})")
    elif resuming:
        say(f"{run_dir} has a config but no checkpoint yet: starting from step 0")
    stages = "" if len(trainer.stages) == 1 else f" in {len(trainer.stages)} stages"
    images = ""
    if trainer.images is not None:
        fraction = config.data.image_fraction
        images = f" and {describe_size(trainer.images.dataset)} ({fraction:.0%} of each batch, as one-frame clips)"
    say(
        f"training {trainer.num_levels}-level model ({sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f}M "
        f"parameters) on {describe_size(trainer.dataset, config.data.frames)}{images} at "
        f"{config.data.resolution}px, {trainer.total_steps} steps"
        f"{stages}, device {trainer.device}, {'bf16 autocast' if trainer.bf16 else 'fp32'}"
    )
    if trainer.step >= trainer.total_steps:
        say(f"nothing to train: the run is at step {trainer.step} of {trainer.total_steps} (raise train.steps)")
    report = getattr(trainer.dataset, "skip_report", None)
    if report is not None:
        say(report())
    try:
        checkpoint = trainer.train()
    except TrainingStopped as stop:
        say(f"{stop} (checkpoint: {stop.checkpoint})", file=sys.stderr)
        return stop.exit_code
    except torch.OutOfMemoryError:
        raise UserError(
            f"out of memory on {trainer.device} at {config.data.resolution}px with batch {trainer.stage.batch_size}: "
            "lower train.batch_size (train.grad_accum keeps the global batch) or the model size; "
            "run the same command to resume from the last checkpoint"
        ) from None
    left = trainer.run_end_seconds - trainer.train_seconds
    if trainer.step >= trainer.total_steps and math.isfinite(left) and left > 0:
        # A time-limited run that ran out of steps first: say so, or "MINUTES=60" silently trains less.
        say(
            f"reached the last step ({trainer.total_steps}) with {left / 60:.1f} of train.max_minutes="
            f"{config.train.max_minutes:g} left: raise train.steps to train for the minutes"
        )
    samples = sorted((run_dir / "samples").glob(f"step_{trainer.step:08d}_*.png"))
    say(
        f"done: {trainer.step} steps. run: {run_dir}  checkpoint: {checkpoint}  samples: "
        f"{', '.join(str(p) for p in samples)}"
    )
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train a model (resumes an existing run directory)")
    train.add_argument("config", nargs="?", help=f"preset name or YAML file (default: {DEFAULT_PRESET})")
    train.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides, e.g. train.steps=2000")
    train.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue this run directory, or go back to one of its checkpoints (RUN/checkpoints/step_N)",
    )
    train.add_argument("--nproc", type=int, help="launch torchrun with this many processes per node")
    train.add_argument(
        "--torchrun-args",
        dest="torchrun_args",
        default=[],
        type=str.split,
        help='extra torchrun flags for multi-node runs, e.g. "--nnodes=2 --node_rank=0 --rdzv_endpoint=host:29500"',
    )
    train.set_defaults(func=cmd_train)
