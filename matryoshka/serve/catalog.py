"""The models a server offers: loaded once at start, from the paths on the command line only."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..pipeline import Pipeline, load_encoder, load_pipeline

CPU_STEPS = 12
"""Default steps on a CPU (capped by the run's own ``sample.steps``): answers in seconds."""
CPU_NUM = 4
"""Default number of images on a CPU (capped by the run's ``sample.num``)."""
MAX_NUM = {"cpu": 16, "other": 64}
"""Most images one request may ask for: a queue of users shares one device."""


class ModelLoadError(ValueError):
    """A run or checkpoint that cannot be served; the message is one line naming the path."""


@dataclass
class ServedModel:
    """One model of the dropdown: its pipeline and the controls that fit it."""

    source: str
    """The path exactly as given on the command line (used in the equivalent ``mdm sample``)."""
    pipe: Pipeline
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.source}: {len(self.class_names)} class names for {self.num_classes} classes")

    @property
    def label(self) -> str:
        return f"{self.source} (step {self.pipe.step})"

    @property
    def has_text(self) -> bool:
        return bool(self.pipe.model.config.text_dim)

    @property
    def num_classes(self) -> int:
        return self.pipe.model.config.num_classes or 0

    @property
    def conditional(self) -> bool:
        return self.has_text or self.num_classes > 0

    @property
    def sides(self) -> list[int]:
        """Side of every level, highest resolution first (the order of the pipeline's output)."""
        process = self.pipe.process
        return [self.pipe.resolution // process.factor**level for level in range(process.num_levels)]

    @property
    def example_prompts(self) -> list[str]:
        """The prompts the run drew its sample grids with during training."""
        return list(dict.fromkeys(p for p in self.pipe.config.sample.prompts if p.strip()))

    @property
    def on_cpu(self) -> bool:
        return self.pipe.device.type == "cpu"

    @property
    def default_steps(self) -> int:
        steps = self.pipe.config.sample.steps
        return min(steps, CPU_STEPS) if self.on_cpu else steps

    @property
    def default_num(self) -> int:
        num = self.pipe.config.sample.num
        return min(num, CPU_NUM) if self.on_cpu else min(num, self.max_num)

    @property
    def max_num(self) -> int:
        return MAX_NUM["cpu" if self.on_cpu else "other"]

    @property
    def max_steps(self) -> int:
        return self.pipe.process.num_steps


def load_model(source: str, device: str | torch.device = "auto") -> ServedModel:
    """Load a run or checkpoint and everything generation will need, so that a missing
    checkpoint, a corrupt file or a missing text encoder stops the server at start."""
    try:
        pipe = load_pipeline(source, device=device)
        if pipe.model.config.text_dim:
            pipe.text_encoder = load_encoder(pipe.config, pipe.device)
    except Exception as error:  # a boundary: whatever went wrong becomes one line naming the path
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"cannot serve {source}: {message}") from error
    return ServedModel(source, pipe, class_names(pipe))


def load_models(sources: list[str], device: str | torch.device = "auto") -> dict[str, ServedModel]:
    """The models by source path, in command-line order."""
    models: dict[str, ServedModel] = {}
    for source in sources:
        if source in models:
            raise ModelLoadError(f"{source} is named twice")
        models[source] = load_model(source, device)
    return models


def class_names(pipe: Pipeline) -> list[str]:
    """Names of the model's classes as saved with the run at training time, else "class K"."""
    count = pipe.model.config.num_classes or 0
    return list(pipe.class_names) if len(pipe.class_names) == count else [f"class {k}" for k in range(count)]


def describe(model: ServedModel) -> str:
    """One line for the page: what the model is and what it takes."""
    kind = (
        "text-to-image"
        if model.has_text
        else (f"{model.num_classes} classes" if model.num_classes else "unconditional")
    )
    levels = " ⊂ ".join(f"{side}²" for side in reversed(model.sides))
    return f"{kind}, levels {levels}, trained {model.pipe.step} steps, on {model.pipe.device.type}"
