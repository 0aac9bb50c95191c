"""``mdm sample``: images at every level from a run or checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import UserError


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
    options = _sampling_overrides(args)
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


def _sampling_overrides(args: argparse.Namespace) -> dict:
    """The sampling flags given on the command line, as overrides of the run's ``sample`` settings."""
    names = ("spacing", "eta", "threshold", "threshold_percentile", "threshold_max", "guidance_interval")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _class_index(pipe, label: str) -> int:
    """A class index, or a class name as saved with the run at training time."""
    if label.lstrip("-").isdigit():
        return int(label)
    if not pipe.class_names:
        raise UserError(
            f"--class {label!r}: this checkpoint does not record its class names (trained before they were "
            f"saved with runs): give the class index 0..{pipe.model.config.num_classes - 1} instead"
        )
    if label in pipe.class_names:
        return pipe.class_names.index(label)
    raise UserError(f"unknown class '{label}'; classes: {', '.join(pipe.class_names)}")


def add_parser(commands: argparse._SubParsersAction) -> None:
    sample = commands.add_parser("sample", help="sample images from a run or checkpoint")
    sample.add_argument("run", help="run directory or checkpoint directory")
    sample.add_argument("--num", type=int, default=16, help="images (per prompt, with prompts)")
    sample.add_argument("--steps", type=int)
    sample.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++2m"])
    sample.add_argument("--spacing", choices=["trailing", "mlmdm"], help="time steps (default: the run's sample.spacing)")
    sample.add_argument("--guidance", type=float)
    sample.add_argument("--guidance-interval", dest="guidance_interval", type=float, nargs=2, metavar=("LO", "HI"),
                        help="guide only the steps with LO <= t/T <= HI (default: the run's sample.guidance_interval)")
    sample.add_argument("--eta", type=float, help="DDIM stochasticity, 0 (deterministic) to 1 (default: sample.eta)")
    sample.add_argument("--threshold", choices=["none", "clip", "dynamic", "dynamic_if"],
                        help="x0 thresholding: none, clip to [-1, 1], dynamic as Imagen or as DeepFloyd IF "
                             "(default: sample.threshold)")
    sample.add_argument("--threshold-percentile", dest="threshold_percentile", type=float,
                        help="percentile of |x0| for dynamic thresholding (default: 0.995 dynamic, 0.95 dynamic_if)")
    sample.add_argument("--threshold-max", dest="threshold_max", type=float,
                        help="cap on the dynamic threshold s (default: none for dynamic, 1.5 for dynamic_if)")
    sample.add_argument("--class", dest="class_label", help="class index or name")
    sample.add_argument("--prompt", action="append", help="text prompt (repeat for several; one grid row each)")
    sample.add_argument("--prompt-file", dest="prompt_file", help="file with one prompt per line")
    sample.add_argument("--negative-prompt", dest="negative_prompt", help="prompt for the unconditional branch of guidance")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", help="output directory (default: RUN/samples/sample_STEP)")
    sample.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights")
    sample.add_argument("--device", default="auto")
    sample.set_defaults(func=cmd_sample)
