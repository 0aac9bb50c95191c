"""Generating the samples an evaluation measures: settings, per-batch seeds, a resumable cache.

Sample ``i`` of batch ``b`` depends only on (checkpoint, sampler settings, seed, batch size),
so an interrupted evaluation continues where it stopped and a larger ``num`` reuses what exists.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config.run import SAMPLER_OPTIONS
from .errors import EvaluationError
from .features import images_to_uint8


@dataclass
class SampleSettings:
    sampler: str
    steps: int
    guidance: float
    seed: int = 0
    batch_size: int = 16
    labels: str = "none"
    """How class labels are chosen: "none" (unconditional model) or "cycle" (sample i gets class i mod C)."""
    prompts: str = ""
    """Text-to-image models: "<count> prompts sha256:<digest>"; sample i gets prompt i mod count."""
    options: dict[str, Any] = field(default_factory=dict)
    """Overrides of the run's other ``sample`` settings (spacing, eta, threshold, ..., as `mdm sample` takes them)."""
    autoguidance: str = ""
    """The autoguidance in effect, "weight <w>, guide <path>" ("" for none)."""


def options_tag(options: dict[str, Any]) -> str:
    """A file-name part naming sampling overrides, e.g. ``_threshold-dynamic_spacing-mlmdm`` ("" for none)."""

    def text(value: Any) -> str:
        if isinstance(value, str) and any(sep in value for sep in "/\\"):  # a path (--guide) names no file
            return "sha" + hashlib.sha256(value.encode("utf-8")).hexdigest()[:8]
        if isinstance(value, (list, tuple)):
            return "-".join(text(item) for item in value)
        return f"{value:g}" if isinstance(value, float) else str(value)

    return "".join(f"_{name.replace('_', '-')}-{text(value)}" for name, value in sorted(options.items()))


def prompts_digest(prompts: Sequence[str] | None) -> str:
    if not prompts:
        return ""
    digest = hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()[:16]
    return f"{len(prompts)} prompts sha256:{digest}"


def resolve_settings(
    pipeline,
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    prompts: Sequence[str] | None = None,
    options: dict[str, Any] | None = None,
) -> SampleSettings:
    """The effective settings: the run's ``sample`` config fills what is not given. ``options``:
    overrides of its other fields (``Pipeline.generate``'s options), checked here, before sampling."""
    defaults = pipeline.config.sample
    if batch_size < 1:
        raise EvaluationError("batch size must be >= 1")
    options = {name: value for name, value in (options or {}).items() if value is not None}
    unknown = sorted(set(options) - set(SAMPLER_OPTIONS))
    if unknown:
        raise EvaluationError(
            f"sampling options {unknown}: valid are {', '.join(SAMPLER_OPTIONS)} "
            "(sampler, steps, guidance and seed are arguments of their own)"
        )
    try:
        effective = pipeline.sample_settings(sampler, **options)
        guide = pipeline.guide_path(effective)
    except ValueError as error:
        raise EvaluationError(f"sampling settings: {error}") from None
    options = effective.recorded_options(options)  # they name the cache and the report
    text_model = bool(getattr(pipeline.model.config, "text_dim", 0))
    if text_model and not prompts:
        raise EvaluationError(
            "this is a text-to-image model: give the prompts to generate from (--prompts FILE, "
            "one per line; sample i uses prompt i mod their count)"
        )
    if prompts and not text_model:
        raise EvaluationError(
            "this model has no text conditioning: --prompts needs a text-to-image model "
            "(use --clip-prompt for the CLIP score's text)"
        )
    return SampleSettings(
        sampler=sampler or defaults.sampler,
        steps=int(steps or defaults.steps),
        guidance=float(defaults.guidance if guidance is None else guidance),
        seed=int(seed),
        batch_size=int(batch_size),
        labels="cycle" if pipeline.model.config.num_classes else "none",
        prompts=prompts_digest(prompts),
        options=options,
        autoguidance="" if guide is None else f"weight {effective.autoguidance:g}, guide {guide}",
    )


def level_sizes(pipeline) -> list[int]:
    """Sides of the model's levels, highest first."""
    process = pipeline.process
    return [pipeline.resolution // process.factor**i for i in range(process.num_levels)]


def batch_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index) % (2**63)


class SampleCache:
    """A folder of generated batches: ``meta.json`` and ``batch_NNNNNN.npz`` (uint8 levels and labels)."""

    def __init__(self, directory: str | Path, meta: dict[str, Any]) -> None:
        self.directory = Path(directory).expanduser()
        self.meta = json.loads(json.dumps(meta))
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "meta.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved != self.meta:
                changed = sorted(k for k in set(saved) | set(self.meta) if saved.get(k) != self.meta.get(k))
                raise EvaluationError(
                    f"the sample cache {self.directory} was made with other settings ({', '.join(changed)}); "
                    f"delete it or pass another --cache"
                )
        else:
            path.write_text(json.dumps(self.meta, indent=2) + "\n")

    def path(self, index: int) -> Path:
        return self.directory / f"batch_{index:06d}.npz"

    def load(self, index: int, count: int, sizes: Sequence[int]) -> tuple[list[np.ndarray], np.ndarray] | None:
        path = self.path(index)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                levels = [data[f"level_{size}"] for size in sizes]
                labels = data["labels"]
        except (OSError, KeyError, ValueError):
            return None  # a torn or foreign file: generate the batch again
        if any(len(level) != count for level in levels):
            return None
        return levels, labels

    def save(self, index: int, levels: Sequence[np.ndarray], sizes: Sequence[int], labels: np.ndarray) -> None:
        path = self.path(index)
        temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(temporary, labels=labels, **{f"level_{size}": level for size, level in zip(sizes, levels)})
        os.replace(temporary, path)

    def count(self) -> int:
        return len(list(self.directory.glob("batch_*.npz")))


def default_cache_dir(pipeline, settings: SampleSettings, ema: bool = True) -> Path | None:
    """``RUN/eval/samples/<checkpoint>_<ema|raw>_<sampler><steps>_g<guidance>_seed<seed>_b<batch>[<options>]``."""
    if pipeline.checkpoint is None:
        return None
    checkpoint = Path(pipeline.checkpoint)
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    tag = (
        f"{checkpoint.name}_{'ema' if ema else 'raw'}_{settings.sampler}{settings.steps}_g{settings.guidance:g}"
        f"_seed{settings.seed}_b{settings.batch_size}"
    )
    if settings.prompts:
        tag += "_p" + settings.prompts.rsplit(":", 1)[1][:8]
    tag += options_tag(settings.options)
    return run_dir / "eval" / "samples" / tag


def sample_prompts(prompts: Sequence[str] | None, start: int, count: int) -> list[str] | None:
    """The prompts of samples ``start .. start + count - 1`` (cycled)."""
    if not prompts:
        return None
    return [prompts[(start + j) % len(prompts)] for j in range(count)]


def generate_batches(
    pipeline,
    num: int,
    settings: SampleSettings,
    cache: SampleCache | None = None,
    progress: bool = False,
    prompts: Sequence[str] | None = None,
) -> Iterator[tuple[list[np.ndarray], np.ndarray, list[str] | None]]:
    """Yield (uint8 levels highest first, class labels, prompts) for ``num`` samples, batch by batch."""
    from tqdm.auto import tqdm

    sizes = level_sizes(pipeline)
    num_classes = pipeline.model.config.num_classes
    batches = math.ceil(num / settings.batch_size)
    bar = tqdm(total=num, desc="samples", unit="img", disable=not progress, dynamic_ncols=True)
    reused = 0
    try:
        for index in range(batches):
            start = index * settings.batch_size
            count = min(settings.batch_size, num - start)
            cached = cache.load(index, count, sizes) if cache is not None else None
            if cached is None:
                labels = (np.arange(start, start + count) % num_classes) if num_classes else np.full(count, -1)
                texts = sample_prompts(prompts, start, count)
                cond = None
                if num_classes or texts:
                    cond = pipeline.condition(count, torch.as_tensor(labels) if num_classes else None, texts)
                images = pipeline.generate(
                    num=count,
                    sampler=settings.sampler,
                    steps=settings.steps,
                    guidance=settings.guidance,
                    cond=cond,
                    seed=batch_seed(settings.seed, index),
                    **settings.options,
                )
                levels = [images_to_uint8(level) for level in images]
                if [level.shape[-1] for level in levels] != sizes:
                    raise EvaluationError(
                        f"the model made levels {[level.shape[-1] for level in levels]}, expected {sizes}"
                    )
                if cache is not None:
                    cache.save(index, levels, sizes, labels)
            else:
                levels, labels = cached
                reused += count
            bar.update(count)
            if reused:
                bar.set_postfix(cached=reused)
            yield levels, labels, sample_prompts(prompts, start, count)
    finally:
        bar.close()
