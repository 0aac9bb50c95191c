"""``mdm sample``: images (or, for a video run, clips: mp4, gif and a PNG strip each) at every level."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import torch

from . import arguments
from .errors import UserError

GRID_LIMIT = 64
"""Images per grid; a larger ``--num`` is written batch by batch without holding them all."""


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file).expanduser()
        if not path.is_file():
            raise UserError(f"--prompt-file {path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise UserError(f"--prompt-file {path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if any(not prompt.strip() for prompt in prompts):
        raise UserError("--prompt: a prompt is empty (for the unconditional branch use --negative-prompt '')")
    return prompts


def _output_folder(out: str | None, pipe) -> Path:
    """A folder of its own for this sampling: ``--out`` if new or empty, else the next RUN/samples/sample_STEP_NNN."""
    if out is not None:
        folder = Path(out).expanduser()
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--out {folder} is a file, not a folder")
        if folder.is_dir() and any(folder.iterdir()):
            raise UserError(
                f"--out {folder} already holds files; each sampling gets a folder of its own (with the "
                "settings.json that made its images): choose another --out, or leave it out"
            )
    else:
        checkpoint = Path(pipe.checkpoint)
        run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint
        index = 1
        while (folder := run_dir / "samples" / f"sample_{pipe.step:08d}_{index:03d}").exists():
            index += 1
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _command_line(
    args: argparse.Namespace, steps: int, sampler: str, guidance: float, prompts: list[str], options: dict
) -> str:
    """The ``mdm sample`` call that makes these images again."""
    parts = [
        "mdm",
        "sample",
        args.run,
        "--num",
        str(args.num),
        "--steps",
        str(steps),
        "--sampler",
        sampler,
        "--guidance",
        f"{guidance:g}",
        "--seed",
        str(args.seed),
        "--batch-size",
        str(args.batch_size),
    ]
    parts += [f"--prompt={prompt}" for prompt in prompts]
    if args.negative_prompt is not None:
        parts.append(f"--negative-prompt={args.negative_prompt}")
    if args.class_label is not None:
        parts += ["--class", args.class_label]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if name == "eta" and isinstance(value, (list, tuple)):  # one flag value: per-level etas, comma-separated
            value = ",".join(f"{v:g}" for v in value)
        parts += [flag, *map(str, value)] if isinstance(value, (list, tuple)) else [flag, str(value)]
    if not args.ema:
        parts.append("--no-ema")
    if args.fps != DEFAULT_FPS:
        parts += ["--fps", f"{args.fps:g}"]
    return shlex.join(parts)


DEFAULT_FPS = 8.0


def _level_label(level: torch.Tensor) -> str:
    """``64px`` for images, ``8x32px`` (frames x side) for clips: the level's folder and grid names."""
    return f"{level.shape[2]}x{level.shape[-1]}px" if level.dim() == 5 else f"{level.shape[-1]}px"


def _save_level(level: torch.Tensor, folder: Path, start: int, fps: float) -> None:
    from ..utils.images import save_images
    from ..utils.video import save_clips

    if level.dim() == 5:
        save_clips(level, folder, start=start, fps=fps)
    else:
        save_images(level, folder, prefix="", start=start)


def _save_grid(level: torch.Tensor, path: Path, columns: int | None) -> Path:
    from ..utils.images import save_grid
    from ..utils.video import save_clip_grid

    return save_clip_grid(level, path) if level.dim() == 5 else save_grid(level, path, columns=columns)


def cmd_sample(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..pipeline import load_pipeline

    prompts = _read_prompts(args)
    pipe = load_pipeline(args.run, use_ema=args.ema, device=args.device)
    if prompts and not pipe.model.config.text_dim:
        raise UserError("this model has no text conditioning; --prompt needs a text-to-image model")
    if pipe.model.config.text_dim and not prompts:
        raise UserError("this is a text-to-image model: give --prompt TEXT (or --prompt-file FILE)")
    defaults = pipe.config.sample
    steps = defaults.steps if args.steps is None else args.steps
    sampler = args.sampler or defaults.sampler
    guidance = defaults.guidance if args.guidance is None else args.guidance
    # With prompts, --num images per prompt, one grid row per prompt.
    total = args.num * max(1, len(prompts))
    per_sample_prompts = [p for p in prompts for _ in range(args.num)]
    label = _class_index(pipe, args.class_label) if args.class_label is not None else None
    num_classes = pipe.model.config.num_classes
    if steps > pipe.process.schedule.num_steps:
        raise UserError(f"--steps {steps}: the model's schedule has {pipe.process.schedule.num_steps} steps")
    if args.negative_prompt is not None and not pipe.model.config.text_dim:
        raise UserError("--negative-prompt needs a text-to-image model")
    options = arguments.sampling_overrides(args)
    try:  # a missing guide is refused before any folder is made
        effective = pipe.sample_settings(sampler, **options)
        guide = pipe.guide_path(effective)
    except ValueError as error:
        raise UserError(str(error)) from None
    options = effective.recorded_options(options)
    out = _output_folder(args.out, pipe)
    batches = range(0, total, args.batch_size)
    kept: list[list] = []
    with tqdm(total=steps * len(batches), desc="sampling", unit="step", dynamic_ncols=True) as bar:
        for batch, start in enumerate(batches):
            count = min(args.batch_size, total - start)
            labels = None
            if num_classes:  # one class, or all of them in turn
                labels = [label] * count if label is not None else [(start + i) % num_classes for i in range(count)]
            cond = pipe.condition(count, labels, per_sample_prompts[start : start + count] or None)
            uncond = pipe.negative(cond, args.negative_prompt) if args.negative_prompt is not None else None
            # Batch b is seeded with seed + b: the first batch is the same whatever --num is.
            levels = pipe.generate(
                num=count,
                sampler=sampler,
                steps=steps,
                guidance=guidance,
                cond=cond,
                uncond=uncond,
                seed=args.seed + batch,
                callback=lambda *_: bar.update(1),
                **options,
            )
            for index, level in enumerate(levels):
                _save_level(level, out / _level_label(level), start, args.fps)
                if start < GRID_LIMIT:
                    if batch == 0:
                        kept.append([])
                    kept[index].append(level[: GRID_LIMIT - start].cpu())
    columns = args.num if prompts else None
    grids = [_save_grid(torch.cat(level), out / f"grid_{_level_label(level[0])}.png", columns) for level in kept]
    if prompts:
        (out / "prompts.txt").write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    settings = {
        "command": _command_line(args, steps, sampler, guidance, prompts, options),
        "checkpoint": str(pipe.checkpoint),
        "step": pipe.step,
        "ema": args.ema,
        "num": total,
        "sampler": sampler,
        "steps": steps,
        "guidance": guidance,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "spacing": args.spacing or defaults.spacing,
        "prompts": prompts,
        "negative_prompt": args.negative_prompt,
        "class": args.class_label,
        "levels": [_level_label(level[0]) for level in kept],
        "fps": args.fps,
        **options,
        "autoguidance": None if guide is None else {"weight": effective.autoguidance, "guide": str(guide)},
    }
    (out / "settings.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    print(
        f"wrote {total} samples at {', '.join(settings['levels'])} to {out} "
        f"(grids: {', '.join(str(grid) for grid in grids)}; settings: {out / 'settings.json'})"
    )
    return 0


def _class_index(pipe, label: str) -> int:
    """A class index, or a class name as saved with the run at training time."""
    num_classes = pipe.model.config.num_classes
    if not num_classes:
        raise UserError("--class: this model is not class-conditional")
    if label.lstrip("-").isdigit():
        index = int(label)
        if not 0 <= index < num_classes:
            raise UserError(f"--class {index}: this model has classes 0..{num_classes - 1}")
        return index
    if not pipe.class_names:
        raise UserError(
            f"--class {label!r}: this checkpoint does not record its class names (trained before they were "
            f"saved with runs): give the class index 0..{num_classes - 1} instead"
        )
    if label in pipe.class_names:
        return pipe.class_names.index(label)
    raise UserError(f"unknown class '{label}'; classes: {', '.join(pipe.class_names)}")


def add_parser(commands: argparse._SubParsersAction) -> None:
    sample = commands.add_parser("sample", help="sample images from a run or checkpoint")
    sample.add_argument("run", help="run directory or checkpoint directory")
    sample.add_argument("--num", type=arguments.positive_int, default=16, help="images (per prompt, with prompts)")
    sample.add_argument("--steps", type=arguments.positive_int, help="default: the run's sample.steps")
    sample.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++2m"])
    sample.add_argument("--guidance", type=arguments.guidance, help="classifier-free guidance scale (1: none)")
    arguments.add_sampling_options(sample)
    sample.add_argument("--class", dest="class_label", help="class index or name")
    sample.add_argument("--prompt", action="append", help="text prompt (repeat for several; one grid row each)")
    sample.add_argument("--prompt-file", dest="prompt_file", help="file with one prompt per line")
    sample.add_argument(
        "--negative-prompt", dest="negative_prompt", help="prompt for the unconditional branch of guidance"
    )
    sample.add_argument(
        "--seed", type=arguments.seed, default=0, help="seed of the first batch (batch b uses seed + b)"
    )
    sample.add_argument(
        "--batch-size",
        dest="batch_size",
        type=arguments.positive_int,
        default=16,
        help="images generated at once; each batch is written before the next starts",
    )
    sample.add_argument("--out", help="a new or empty folder (default: the next RUN/samples/sample_STEP_NNN)")
    sample.add_argument(
        "--fps", type=arguments.fps, default=DEFAULT_FPS, help="frames per second of a video run's mp4/gif"
    )
    sample.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights")
    sample.add_argument("--device", default="auto")
    sample.set_defaults(func=cmd_sample)
