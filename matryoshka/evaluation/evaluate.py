"""Evaluate a model: generate samples, measure every pyramid level against a reference.

    from matryoshka.pipeline import load_pipeline
    from matryoshka.evaluation import evaluate_pipeline
    pipe = load_pipeline("runs/emoji64")
    evaluate_pipeline(pipe, "emoji", num=500)    # {"fd_effnet-lite0/64x64": ..., "fd_effnet-lite0/16x16": ...}

:func:`run_evaluation` returns the full report that ``mdm eval`` writes as JSON; the samples
can be kept in a resumable cache (one ``.npz`` of 8-bit images per batch), so an
interrupted evaluation continues where it stopped and a larger ``num`` reuses what exists.
Sample ``i`` of batch ``b`` depends only on (checkpoint, sampler settings, seed, batch size).
A video model's samples are clips: its metrics are per frame, plus the temporal measures (:mod:`.video`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import EvaluationError
from .features import FeatureExtractor, build_feature_extractor, resolve_feature_name, uint8_to_images
from .fvd import start_fvd
from .reference import ReferenceStats, compute_reference_stats, pick_subset
from .sampling import SampleCache, generate_batches, level_sizes, resolve_settings
from .stats import FeatureStats, frechet_distance, frechet_distance_to_samples, kernel_distance, precision_recall
from .video import ClipLayout, TemporalStats, clip_layout, clip_rows, frames_of, level_name, video_summary

METRICS = ("fd", "kid", "pr", "temporal", "clip", "fvd")
_ALIASES = {"fid": "fd", "precision": "pr", "recall": "pr", "precision_recall": "pr", "clip_score": "clip"}
NEEDS_FEATURES = ("kid", "pr")
"""Metrics that need the reference's feature vectors, not only its mean and covariance."""


def parse_metrics(metrics: str | Sequence[str]) -> tuple[str, ...]:
    """``"fd,kid"`` or ``["fid", "pr"]`` -> canonical names in METRICS order."""
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    chosen = set()
    for name in names:
        name = name.strip().lower()
        if not name:
            continue
        name = _ALIASES.get(name, name)
        if name not in METRICS:
            raise EvaluationError(f"unknown metric {name!r}; choose from {', '.join(METRICS)} (fid is an alias of fd)")
        chosen.add(name)
    if not chosen:
        raise EvaluationError("no metric chosen")
    return tuple(m for m in METRICS if m in chosen)


# ----------------------------------------------------------------------------- references
_REFERENCE_CACHE: dict[tuple, ReferenceStats] = {}


def load_reference(
    reference,
    extractor: FeatureExtractor,
    resolution: int,
    sizes: Sequence[int],
    run_data=None,
    max_images: int | None = None,
    max_features: int | None = 10_000,
    batch_size: int = 64,
    progress: bool = False,
    layout: ClipLayout | None = None,
) -> ReferenceStats:
    """A :class:`ReferenceStats` from stats, a ``.npz`` path, or a data spec (folder, ``emoji``,
    ``emoji-motion``, ``train``; clips laid out as ``layout`` for a video model); statistics
    computed from data are kept for the rest of the process."""
    if isinstance(reference, ReferenceStats):
        return reference
    spec = str(reference)
    path = Path(spec).expanduser()
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"reference statistics {path} do not exist")
        return ReferenceStats.load(path)
    key = (
        spec,
        extractor.name,
        extractor.weights,
        resolution,
        tuple(sizes),
        max_images,
        max_features,
        repr(run_data) if spec == "train" or layout else None,
        layout,
    )
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = compute_reference_stats(
            spec,
            extractor,
            resolution,
            sizes,
            max_images,
            max_features,
            batch_size,
            run_data=run_data,
            progress=progress,
            layout=layout,
        )
    return _REFERENCE_CACHE[key]


def reference_feature_name(reference) -> str | None:
    """The feature network of a stats file or object (None for data)."""
    if isinstance(reference, ReferenceStats):
        return reference.feature_name
    path = Path(str(reference)).expanduser()
    if path.suffix == ".npz" and path.is_file():
        with np.load(path, allow_pickle=False) as data:
            return str(data["feature_name"]) if "feature_name" in data else None
    return None


def _class_names(pipeline, class_names):
    """Names for CLIP texts: given, or saved with the run (the training data may have changed since)."""
    return list(class_names) if class_names is not None else list(getattr(pipeline, "class_names", []))


def clip_texts(
    labels: np.ndarray, prompt: str | None, class_names: Sequence[str] | None, prompts: Sequence[str] | None = None
) -> list[str]:
    """One text per sample: the sample's own prompt (text-to-image models), else ``prompt``
    with ``{}`` replaced by the class name, else ``prompt`` as it is."""
    if prompts:
        return list(prompts)
    if class_names:
        template = prompt or "{}"
        return [template.replace("{}", class_names[int(label)]) for label in labels]
    if not prompt or "{}" in prompt:
        raise EvaluationError(
            "the CLIP score needs a text per image: this model has no class names, so pass a fixed "
            "--clip-prompt TEXT (without {})"
        )
    return [prompt] * len(labels)


# ----------------------------------------------------------------------------- evaluation
def run_evaluation(
    pipeline,
    reference,
    num: int = 1000,
    metrics: str | Sequence[str] = ("fd",),
    feature: str | FeatureExtractor | None = "effnet-lite0",
    *,
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    sampling_options: dict[str, Any] | None = None,
    seed: int = 0,
    batch_size: int = 16,
    cache_dir: str | Path | None = None,
    ema: bool | None = None,
    inception_weights: str | Path | None = None,
    i3d_weights: str | Path | None = None,
    device: str | torch.device | None = None,
    feature_batch_size: int = 64,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    pr_k: int = 3,
    max_features: int | None = 10_000,
    max_reference_images: int | None = None,
    clip_model: str | Any = None,
    clip_prompt: str | None = None,
    class_names: Sequence[str] | None = None,
    prompts: Sequence[str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Generate ``num`` samples and compare each pyramid level with the reference.

    ``reference``: a :class:`ReferenceStats`, a ``.npz`` from ``mdm eval-stats``, an image
    folder, ``"emoji"`` or ``"train"`` (the run's training data). ``feature``: a network name
    (``effnet-lite0``, ``inception``, ``auto``) or a ready :class:`FeatureExtractor`.
    ``sampling_options``: overrides of the run's other sample settings (``spacing``, ``eta``,
    ``threshold``, ``threshold_percentile``, ``threshold_max``, ``guidance_interval``).
    ``prompts``: what a text-to-image model generates from (sample i: prompt i mod count),
    e.g. the reference set's captions as in COCO FID-30K; also the CLIP score's texts.
    ``max_features`` caps the feature vectors used by KID and precision/recall (a seeded
    subset of each side; None: all). Returns the report: ``report["metrics"]`` maps ``"<metric>_<feature>/<S>x<S>"``
    to values.
    """
    started = time.perf_counter()
    chosen = parse_metrics(metrics)
    settings = resolve_settings(pipeline, sampler, steps, guidance, seed, batch_size, prompts, sampling_options)
    if num < 2:
        raise EvaluationError("need at least 2 samples")
    if set(chosen) & set(NEEDS_FEATURES) and max_features == 0:
        raise EvaluationError("KID and precision/recall need feature vectors: max_features must not be 0")
    if "pr" in chosen and num <= pr_k:
        raise EvaluationError(f"precision/recall with k={pr_k} needs more than {pr_k} samples")
    sizes = level_sizes(pipeline)
    layout = clip_layout(pipeline)
    for metric in ("temporal", "fvd"):
        if metric in chosen and layout is None:
            raise EvaluationError(f"{metric} needs a video model (model.frames); this one makes images")
    frames = list(layout.level_frames) if layout else [0] * len(sizes)
    names_of = {size: level_name(size, count) for size, count in zip(sizes, frames)}
    device = torch.device(device) if device is not None else pipeline.device
    measure = bool(set(chosen) - {"clip", "fvd"})

    extractor = None
    ref = None
    if measure:
        if isinstance(feature, FeatureExtractor):
            extractor = feature
        else:
            if feature in (None, "auto"):
                feature = reference_feature_name(reference) or resolve_feature_name("auto", inception_weights)
            extractor = build_feature_extractor(feature, inception_weights, device, feature_batch_size)
        # The data every stage of a run trains on is pooled from data.resolution, also while a
        # progressive run is still at its inner levels.
        data_resolution = pipeline.config.data.resolution
        ref = load_reference(
            reference,
            extractor,
            data_resolution,
            sizes,
            pipeline.config.data,
            max_reference_images,
            max_features,
            feature_batch_size,
            progress,
            layout,
        )
        ref.check_compatible(extractor, sizes, data_resolution, layout)
        if set(chosen) & set(NEEDS_FEATURES) and not ref.has_features:
            raise EvaluationError(
                "KID and precision/recall need the reference's feature vectors, which these statistics "
                "do not hold: recompute them with `mdm eval-stats --max-features N` or use --metrics fd"
            )

    fvd = None
    if "fvd" in chosen:
        batch = feature_batch_size
        fvd = start_fvd(pipeline, reference, i3d_weights, sizes, layout, device, max_reference_images, batch)

    scorer, names = None, None
    if "clip" in chosen:
        from .clip import ClipScorer

        if clip_model is None:
            raise EvaluationError(
                "the CLIP score needs a CLIP model: pass --clip-model NAME_OR_PATH (e.g. openai/clip-vit-base-patch32)"
            )
        scorer = (
            clip_model if isinstance(clip_model, ClipScorer) else ClipScorer.from_pretrained(str(clip_model), device)
        )
        names = _class_names(pipeline, class_names) if pipeline.model.config.num_classes else None

    cache = None
    if cache_dir is not None:
        cache = SampleCache(
            cache_dir,
            {
                "checkpoint": str(pipeline.checkpoint) if pipeline.checkpoint else None,
                "step": pipeline.step,
                "ema": ema,
                "levels": sizes,
                **({"frames": frames} if layout else {}),
                # Caches made before sampling options existed stay valid: no options, no key.
                **{
                    key: value
                    for key, value in asdict(settings).items()
                    if key not in ("options", "autoguidance") or value
                },
            },
        )

    keep = pick_subset(num, max_features, seed=1)
    fake_stats = {size: FeatureStats(extractor.dim) for size in sizes} if measure else {}
    fake_kept: dict[int, list[np.ndarray]] = {size: [] for size in sizes}
    fake_temporal = {size: TemporalStats(count) for size, count in zip(sizes, frames) if count > 1}
    clip_sums = {size: 0.0 for size in sizes}
    seen = 0
    generation_started = time.perf_counter()
    for levels, labels, batch_prompts in generate_batches(pipeline, num, settings, cache, progress, prompts):
        count = len(labels)
        rows = keep[(keep >= seen) & (keep < seen + count)] - seen
        texts = clip_texts(labels, clip_prompt, names, batch_prompts) if scorer is not None else None
        for size, level_frames, pixels in zip(sizes, frames, levels):
            # a clip's frames are its images: per-frame metrics, each frame with its clip's text
            clips = uint8_to_images(pixels)
            images = frames_of(clips) if layout else clips
            per_sample = max(level_frames, 1)
            if measure:
                features = extractor(images)
                fake_stats[size].update(features)
                if len(rows):
                    fake_kept[size].append(features[clip_rows(rows, per_sample)])
                if "temporal" in chosen and size in fake_temporal:
                    fake_temporal[size].update(clips, features)
            if fvd is not None:
                fvd.add_generated(size, clips)
            if scorer is not None:
                frame_texts = [text for text in texts for _ in range(per_sample)]
                clip_sums[size] += float(scorer.scores(images, frame_texts).sum()) / per_sample
        seen += count
    generation_seconds = time.perf_counter() - generation_started

    results: dict[str, float] = {}
    details: dict[str, dict] = {}
    for size in sizes:
        level = names_of[size]
        if measure:
            name = extractor.name
            real = ref.levels[size]
            fake = fake_stats[size]
            fake_features = np.concatenate(fake_kept[size]) if fake_kept[size] else None
            if "fd" in chosen:
                if fake_features is not None and len(fake_features) == fake.count <= extractor.dim:
                    value = frechet_distance_to_samples(real.mean, real.cov, fake_features)  # same value, faster
                else:
                    value = frechet_distance(real.mean, real.cov, fake.mean, fake.cov)
                results[f"fd_{name}/{level}"] = value
            if "kid" in chosen:
                kid = kernel_distance(real.features, fake_features, kid_subset_size, kid_subsets, seed=0)
                results[f"kid_{name}/{level}"] = kid.mean
                results[f"kid_std_{name}/{level}"] = kid.std
                details.setdefault("kid", {"subset_size": kid.subset_size, "subsets": kid.subsets})
            if "pr" in chosen:
                precision, recall = precision_recall(real.features, fake_features, k=pr_k)
                results[f"precision_{name}/{level}"] = precision
                results[f"recall_{name}/{level}"] = recall
                details.setdefault("pr", {"k": pr_k, "real": len(real.features), "fake": len(fake_features)})
            if size in fake_temporal and "temporal" in chosen:
                # generated and reference side by side: the reference says what natural motion gives
                results[f"frame_diff/{level}"] = fake_temporal[size].frame_diff
                results[f"frame_diff_ref/{level}"] = real.temporal.frame_diff
                results[f"frame_dist_{name}/{level}"] = fake_temporal[size].frame_dist
                results[f"frame_dist_ref_{name}/{level}"] = real.temporal.frame_dist
        if scorer is not None:
            results[f"clip_score_{scorer.name}/{level}"] = clip_sums[size] / num

    if fvd is not None:
        results.update(fvd.results(names_of))
    report: dict[str, Any] = {
        "metrics": results,
        "feature": extractor.describe() if extractor is not None else None,
        "num": num,
        "levels": [names_of[size] for size in sizes],
        "checkpoint": str(pipeline.checkpoint) if pipeline.checkpoint else None,
        "step": pipeline.step,
        "train_minutes": None if pipeline.train_seconds is None else round(pipeline.train_seconds / 60, 2),
        "ema": ema,
        "sampling": asdict(settings),
        "reference": None
        if ref is None
        else {
            "source": ref.source or ref.meta.get("path", ""),
            "stats_file": ref.meta.get("path"),
            "count": {names_of[s]: ref.levels[s].count for s in sizes},
            "features_kept": {
                names_of[s]: 0 if ref.levels[s].features is None else len(ref.levels[s].features) for s in sizes
            },
        },
        "cache": str(cache.directory) if cache is not None else None,
        "seconds": {
            "sampling_and_features": round(generation_seconds, 2),
            "total": round(time.perf_counter() - started, 2),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **details,
    }
    if fvd is not None:
        report["fvd"] = fvd.describe(names_of)
    if scorer is not None:
        report["clip"] = {"model": scorer.name, "prompt": clip_prompt, "convention": "100 * max(cos, 0), mean"}
    reference_count = None if ref is None else min(ref.levels[s].count for s in sizes)
    if layout is not None:
        reference_count = None if ref is None else ref.levels[sizes[0]].temporal.clips
        report["video"] = video_summary(layout, reference_count)
    report["warnings"] = _sample_size_warnings(num, reference_count, measure, "clips" if layout else "images")
    if fvd is not None:
        report["warnings"] += fvd.warnings()
    return report


FEW_IMAGES = 100
"""Below this many images on either side, FD and KID are too noisy (and biased) to compare runs."""


def _sample_size_warnings(num: int, reference_count: int | None, measured: bool, unit: str = "images") -> list[str]:
    if not measured:
        return []
    sides = [("generated samples", num), (f"reference {unit}", reference_count)]
    return [
        f"only {count} {what}: FD/KID from fewer than {FEW_IMAGES} {unit} are dominated by noise and bias; "
        "compare only numbers measured with the same counts"
        for what, count in sides
        if count is not None and count < FEW_IMAGES
    ]


def evaluate_pipeline(
    pipeline,
    reference,
    num: int = 1000,
    feature: str | FeatureExtractor = "effnet-lite0",
    metrics: str | Sequence[str] = ("fd",),
    **options,
) -> dict[str, float]:
    """Metrics only, e.g. ``{"fd_effnet-lite0/64x64": 41.2, "fd_effnet-lite0/16x16": 12.9}``.

    For periodic evaluation during training: the feature network and reference statistics
    computed from data are cached per process, so only sampling and features cost each time.
    ``options`` are those of :func:`run_evaluation` (sampler, steps, guidance, seed, batch_size...).
    """
    return run_evaluation(pipeline, reference, num, metrics, feature, **options)["metrics"]
