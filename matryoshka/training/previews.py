"""What a run shows of itself while it trains: sample grids and quality metrics of the EMA model."""

from __future__ import annotations

from pathlib import Path

from ..diffusion.spacetime import level_name
from ..pipeline import Pipeline
from ..utils.images import save_grid
from ..utils.video import save_clip_grid
from .metrics import MetricsLog


def save_sample_grids(pipeline: Pipeline, dataset, folder: Path) -> list[Path]:
    """Grids of ``sample.num`` samples, one image per level (for clips, a row of frames per sample).

    Text models without ``sample.prompts`` use captions spread over the training data.
    """
    config, step = pipeline.config, pipeline.step
    num = config.sample.num
    prompts = config.sample.prompts
    if pipeline.model.config.text_dim and not prompts:
        if getattr(dataset, "streaming", False):
            prompts = dataset.first_captions(num)
        else:
            prompts = [dataset[(i * len(dataset) // num, 0)]["caption"] for i in range(num)]
    levels = pipeline.generate(num=num, cond=pipeline.condition(num, prompts=prompts or None))
    return [
        save_clip_grid(level, folder / f"step_{step:08d}_{level_name(level)}px.png")
        if level.dim() == 5
        else save_grid(level, folder / f"step_{step:08d}_{level.shape[-1]}px.png")
        for level in levels
    ]


def evaluate_run(pipeline: Pipeline) -> dict[str, float]:
    """The run's ``eval`` metrics at every level, e.g. fd_effnet-lite0/64x64."""
    from ..evaluation import evaluate_pipeline

    settings, sample = pipeline.config.eval, pipeline.config.sample
    return evaluate_pipeline(
        pipeline,
        settings.reference,
        num=settings.num,
        feature=settings.feature,
        metrics=tuple(settings.metrics),
        sampler=settings.sampler,
        steps=settings.steps,
        batch_size=settings.batch_size,
        seed=sample.seed,
        prompts=sample.prompts or None,
        max_reference_images=settings.max_reference,
    )


def write_previews(
    pipeline: Pipeline, dataset, run_dir: Path, metrics: MetricsLog, sample: bool, evaluate: bool
) -> None:
    """Rank 0's share of a preview: sample grids (a failed write only warns) and/or a logged evaluation."""
    if sample:
        try:
            save_sample_grids(pipeline, dataset, run_dir / "samples")
        except OSError as error:
            metrics.warn(f"could not write samples: {error}")
    if evaluate:
        metrics.write({"step": pipeline.step, **evaluate_run(pipeline)})
