"""``mdm eval`` and ``mdm eval-stats``: sample quality metrics at every pyramid level.

Wired into the main parser with ``add_parsers(commands)``; errors follow the CLI-wide rule
of ``cli/errors.py`` (one line and exit status 2 for a problem with the inputs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

from ..evaluation.errors import EvaluationError
from ..evaluation.sampling import options_tag
from ..evaluation.video import ClipLayout, level_name
from . import arguments

DEFAULT_NUM = 1000
DEFAULT_METRICS = "fd,kid,pr"


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated level sides like 64,16, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive level sides, got {text!r}")
    return sizes


def _feature_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--feature",
        default="auto",
        choices=["auto", "inception", "effnet-lite0"],
        help="feature network: inception (FID-standard; needs its weights), effnet-lite0 (offline, "
        "not FID-comparable), auto: inception when its weights are on this machine "
        "(or the --reference statistics' network), else effnet-lite0",
    )
    parser.add_argument(
        "--inception-weights",
        metavar="PATH",
        help="pt_inception-2015-12-05-6726825d.pth (default: $MATRYOSHKA_INCEPTION_WEIGHTS, the torch "
        "hub cache, or a download)",
    )
    parser.add_argument("--feature-batch-size", type=arguments.positive_int, default=64)
    parser.add_argument(
        "--max-features",
        type=arguments.non_negative_int,
        default=10_000,
        help="feature vectors kept per level for KID and precision/recall (a seeded subset; 0: none, "
        "which leaves FD only; default 10000)",
    )
    parser.add_argument("--device", default="auto")


def add_parsers(subparsers) -> None:
    """Register ``eval`` and ``eval-stats`` on an ``argparse`` subparsers object."""
    evaluate = subparsers.add_parser(
        "eval",
        help="measure a model's samples against reference images (FD/FID, KID, precision/recall, CLIP score)",
        description="Generate samples and compare every level of the pyramid with reference images "
        "pooled the same way.",
    )
    evaluate.add_argument("run", help="run directory or checkpoint directory")
    evaluate.add_argument(
        "--reference",
        required=True,
        metavar="DATA_OR_STATS",
        help="image folder, 'emoji' (built-in set), 'train' (the run's training data) or a .npz from `mdm eval-stats`; "
        "video runs: a folder of videos, 'emoji-motion', 'train' or a .npz",
    )
    evaluate.add_argument(
        "--num", type=arguments.positive_int, default=DEFAULT_NUM, help=f"samples to generate (default {DEFAULT_NUM})"
    )
    evaluate.add_argument(
        "--metrics",
        help="comma-separated: fd (fid), kid, pr, temporal (video runs), clip, fvd (video runs, needs "
        "--i3d-weights) (default fd,kid,pr, and temporal for video runs)",
    )
    evaluate.add_argument(
        "--i3d-weights",
        metavar="PATH",
        help="StyleGAN-V's i3d_torchscript.pt for --metrics fvd (checked by its git blob id; docs/video.md)",
    )
    _feature_arguments(evaluate)
    evaluate.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++2m"], help="default: the run's sample.sampler")
    evaluate.add_argument("--steps", type=arguments.positive_int, help="default: the run's sample.steps")
    evaluate.add_argument("--guidance", type=arguments.guidance, help="default: the run's sample.guidance")
    arguments.add_sampling_options(evaluate)
    evaluate.add_argument("--seed", type=arguments.seed, default=0)
    evaluate.add_argument("--batch-size", type=arguments.positive_int, default=16, help="samples generated at once")
    evaluate.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights")
    evaluate.add_argument(
        "--cache",
        metavar="DIR",
        help="keep generated samples here so an interrupted run continues "
        "(default: RUN/eval/samples/<checkpoint and settings>)",
    )
    evaluate.add_argument("--no-cache", action="store_true", help="keep samples in memory only")
    evaluate.add_argument(
        "--max-reference-images", type=arguments.positive_int, help="use a seeded subset of the reference data"
    )
    evaluate.add_argument("--kid-subset-size", type=arguments.positive_int, default=1000)
    evaluate.add_argument("--kid-subsets", type=arguments.positive_int, default=100)
    evaluate.add_argument(
        "--pr-k", type=arguments.positive_int, default=3, help="k of the k-NN balls of precision/recall"
    )
    evaluate.add_argument(
        "--prompts",
        metavar="FILE",
        help="text-to-image models: prompts to generate from, one per line (sample i uses line i mod "
        "count), e.g. the reference captions for a COCO-style FID",
    )
    evaluate.add_argument("--clip-model", metavar="NAME_OR_PATH", help="Hugging Face CLIP model for --metrics clip")
    evaluate.add_argument(
        "--clip-prompt",
        metavar="TEXT",
        help="text for the CLIP score; '{}' is replaced by the class name (class-conditional models)",
    )
    evaluate.add_argument(
        "--out", metavar="REPORT.json", help="default: RUN/eval/<checkpoint>_<settings>_n<N>_<feature>.json"
    )
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.set_defaults(func=cmd_eval)

    stats = subparsers.add_parser(
        "eval-stats",
        help="precompute reference statistics (.npz) for `mdm eval --reference`",
        description="Read reference images once and store, per pyramid level, the feature mean and covariance "
        "(enough for FD) and up to --max-features feature vectors (needed by KID and precision/recall).",
    )
    stats.add_argument(
        "data", help="image folder, 'emoji' or 'train' (with --run); for a video run (--run): videos, 'emoji-motion'"
    )
    stats.add_argument("--out", required=True, metavar="STATS.npz")
    _feature_arguments(stats)
    stats.add_argument(
        "--run",
        metavar="RUN_OR_CHECKPOINT",
        help="take the resolution and level sides (and the data for 'train') from this run",
    )
    stats.add_argument("--resolution", type=arguments.positive_int, help="top-level side (default: the run's, else 64)")
    stats.add_argument(
        "--levels",
        type=_sizes,
        metavar="S1,S2,...",
        help="level sides to pool to, e.g. 64,16 (default: the run's levels, else the resolution only)",
    )
    stats.add_argument("--max-images", type=arguments.positive_int, help="use a seeded subset of the data")
    stats.add_argument("--batch-size", type=arguments.positive_int, default=64)
    stats.add_argument("--quiet", action="store_true", help="no progress bar")
    stats.set_defaults(func=cmd_eval_stats)


# ----------------------------------------------------------------------------- helpers
def run_levels(run: str) -> tuple[int, list[int], object, ClipLayout | None]:
    """(top-level side, level sides highest first, data config, clip layout of a video run) of a
    run, without loading weights."""
    from ..checkpoints import checkpoint_info, resolve_checkpoint
    from ..config.presets import load_run_config
    from ..evaluation.video import run_clip_layout

    checkpoint = resolve_checkpoint(run)
    config = load_run_config(checkpoint / "config.yaml")
    levels = int(checkpoint_info(checkpoint)["num_levels"] or config.model.num_levels)
    ratio = config.model.nest_ratio
    resolution = config.data.resolution // ratio ** (config.model.num_levels - levels)
    factor = max(ratio, 2)
    return resolution, [resolution // factor**i for i in range(levels)], config.data, run_clip_layout(config, levels)


def read_prompts(path: str) -> list[str]:
    """One prompt per non-empty line of a UTF-8 file."""
    lines = [line.strip() for line in Path(path).expanduser().read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line]
    if not prompts:
        raise EvaluationError(f"--prompts {path}: no prompts in the file")
    return prompts


def _default_report_path(report: dict, pipeline, metrics: tuple[str, ...]) -> Path:
    """One report per checkpoint, sampling, reference and metrics: other evaluations never overwrite it."""
    checkpoint = Path(pipeline.checkpoint)
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint
    sampling = report["sampling"]
    feature = (report.get("feature") or {}).get("name", "clip")
    source = (report.get("reference") or {}).get("source") or "none"
    reference = re.sub(r"[^A-Za-z0-9]+", "-", Path(str(source)).name).strip("-")[:24] or "ref"
    digest = hashlib.sha256(str(source).encode()).hexdigest()[:6]
    name = (
        f"{checkpoint.name}_{sampling['sampler']}{sampling['steps']}_g{sampling['guidance']:g}_seed{sampling['seed']}"
        f"{options_tag(sampling.get('options', {}))}"
        f"_n{report['num']}_{feature}_{reference}-{digest}_{'-'.join(metrics)}.json"
    )
    return run_dir / "eval" / name


def _check_report_path(out: str | None) -> None:
    """Before any sampling: a folder named as the report would otherwise fail only at the very end."""
    if out is None:
        return
    path = Path(out).expanduser()
    if path.is_dir():
        raise EvaluationError(f"--out {path} is a folder; give the report's file name, e.g. {path / 'report.json'}")
    arguments.folder_or_new(path.parent, "--out")


# ----------------------------------------------------------------------------- commands
def cmd_eval(args: argparse.Namespace) -> int:
    from ..evaluation.evaluate import parse_metrics, run_evaluation
    from ..evaluation.sampling import default_cache_dir, resolve_settings
    from ..evaluation.table import format_table
    from ..pipeline import load_pipeline

    metrics = parse_metrics(args.metrics or DEFAULT_METRICS)
    _check_report_path(args.out)
    prompts = read_prompts(args.prompts) if args.prompts else None
    pipeline = load_pipeline(args.run, use_ema=args.ema, device=args.device)
    if args.metrics is None and pipeline.process.frames is not None:
        metrics = parse_metrics((*metrics, "temporal"))
    options = arguments.sampling_overrides(args)
    settings = resolve_settings(
        pipeline, args.sampler, args.steps, args.guidance, args.seed, args.batch_size, prompts, options
    )
    cache = None if args.no_cache else (args.cache or default_cache_dir(pipeline, settings, args.ema))
    if cache is not None:
        cache = arguments.folder_or_new(cache, "--cache")
    report = run_evaluation(
        pipeline,
        args.reference,
        args.num,
        metrics,
        args.feature,
        sampler=settings.sampler,
        steps=settings.steps,
        guidance=settings.guidance,
        sampling_options=settings.options,
        seed=settings.seed,
        batch_size=settings.batch_size,
        cache_dir=cache,
        ema=args.ema,
        inception_weights=args.inception_weights,
        i3d_weights=args.i3d_weights,
        feature_batch_size=args.feature_batch_size,
        kid_subset_size=args.kid_subset_size,
        kid_subsets=args.kid_subsets,
        pr_k=args.pr_k,
        max_features=args.max_features,
        max_reference_images=args.max_reference_images,
        clip_model=args.clip_model,
        clip_prompt=args.clip_prompt,
        prompts=prompts,
        progress=not args.quiet,
    )
    out = Path(args.out).expanduser() if args.out else _default_report_path(report, pipeline, metrics)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"report: {out}" + (f"  samples: {report['cache']}" if report.get("cache") else ""))
    return 0


def cmd_eval_stats(args: argparse.Namespace) -> int:
    from ..evaluation.features import build_feature_extractor
    from ..evaluation.reference import compute_reference_stats
    from ..pipeline import pick_device

    arguments.folder_or_new(Path(args.out).expanduser().parent, "--out")  # before reading any image
    resolution, sizes, data, layout = 64, None, None, None
    if args.run:
        resolution, sizes, data, layout = run_levels(args.run)
    if layout is not None and (args.resolution or args.levels):
        raise EvaluationError(
            "a video run's statistics take its resolution and levels: leave out --resolution/--levels"
        )
    if args.resolution:
        resolution = args.resolution
        if args.run and not args.levels:
            raise EvaluationError("--resolution with --run needs --levels too")
    sizes = args.levels or sizes or [resolution]
    bad = [s for s in sizes if resolution % s]
    if bad:
        raise EvaluationError(f"level sides {bad} do not divide the resolution {resolution}")
    if args.data == "train" and data is None:
        raise EvaluationError("DATA 'train' needs --run")
    extractor = build_feature_extractor(
        args.feature, args.inception_weights, pick_device(args.device), args.feature_batch_size
    )
    stats = compute_reference_stats(
        args.data,
        extractor,
        resolution,
        sizes,
        args.max_images,
        args.max_features,
        args.batch_size,
        run_data=data,
        progress=not args.quiet,
        layout=layout,
    )
    path = stats.save(args.out)
    kept = {s: 0 if level.features is None else len(level.features) for s, level in stats.levels.items()}
    frames = list(layout.level_frames) if layout else [0] * len(stats.level_sizes)
    names = ", ".join(level_name(s, f) for s, f in zip(stats.level_sizes, frames))
    print(
        f"wrote {path}: {stats.meta['images']} {'clips' if layout else 'images'} from {stats.source}, levels "
        f"{names}, features {extractor.name} ({extractor.dim}-d); "
        f"feature vectors kept for KID/PR: {kept[stats.level_sizes[0]]}"
    )
    return 0
