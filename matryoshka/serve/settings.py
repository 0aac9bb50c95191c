"""What one request asks for, checked against its model, and the ``mdm sample`` command that repeats it."""

from __future__ import annotations

import math
import secrets
import shlex
from dataclasses import asdict, dataclass

from ..diffusion import SAMPLERS
from .catalog import ServedModel

ALL_CLASSES = "(every class in turn)"
"""The class choice that cycles through the classes, as ``mdm sample`` without ``--class``."""
MAX_SEED = 2**63 - 1
FULL_INTERVAL = (0.0, 1.0)


class SettingsError(ValueError):
    """A value the user can fix; the message is shown on the page as it is."""


@dataclass
class Settings:
    """One generation request. Invalid values raise :class:`SettingsError` with a message for the page."""

    model: ServedModel
    prompt: str = ""
    negative_prompt: str = ""
    class_index: int | None = None
    """None cycles through the classes (one class per image)."""
    sampler: str = "dpm++2m"
    steps: int = 12
    guidance: float = 1.0
    guidance_interval: tuple[float, float] = FULL_INTERVAL
    """Guidance applies where t/T lies in [lo, hi]; (0, 1) is everywhere."""
    seed: int = 0
    num: int = 4

    def __post_init__(self) -> None:
        model = self.model
        self.prompt, self.negative_prompt = self.prompt.strip(), self.negative_prompt.strip()
        if model.has_text and not self.prompt:
            raise SettingsError("Prompt: this is a text-to-image model, type a prompt")
        if not model.has_text and (self.prompt or self.negative_prompt):
            raise SettingsError("Prompt: this model takes no text")
        if self.class_index is not None and not 0 <= self.class_index < model.num_classes:
            raise SettingsError(
                f"Class: choose one of the {model.num_classes} classes"
                if model.num_classes
                else "Class: this model takes no class"
            )
        if self.sampler not in SAMPLERS:
            raise SettingsError(f"Sampler: unknown {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not 1 <= self.steps <= model.max_steps:
            raise SettingsError(f"Steps: must be a whole number from 1 to {model.max_steps}, got {self.steps}")
        if not math.isfinite(self.guidance) or not 0 <= self.guidance <= 100:
            raise SettingsError(f"Guidance: must be a number from 0 to 100, got {self.guidance}")
        if not model.conditional and self.guidance != 1:
            raise SettingsError("Guidance: this model is unconditional, so guidance must stay 1")
        lo, hi = self.guidance_interval
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi <= 1):
            raise SettingsError(f"Guidance interval: need 0 ≤ from ≤ to ≤ 1, got {lo} to {hi}")
        if not 0 <= self.seed <= MAX_SEED:
            raise SettingsError(f"Seed: must be a whole number from 0 to {MAX_SEED}, got {self.seed}")
        if not 1 <= self.num <= model.max_num:
            raise SettingsError(f"Images: must be a whole number from 1 to {model.max_num}, got {self.num}")

    @property
    def interval(self) -> tuple[float, float] | None:
        """The sampler's ``guidance_interval`` option (None: guidance at every step)."""
        return None if tuple(self.guidance_interval) == FULL_INTERVAL else tuple(self.guidance_interval)

    @property
    def class_name(self) -> str | None:
        return None if self.class_index is None else self.model.class_names[self.class_index]

    def command(self) -> str:
        """The ``mdm sample`` command line that makes the same images (same seed, same conditioning)."""
        words = [
            "mdm",
            "sample",
            self.model.source,
            "--num",
            str(self.num),
            "--sampler",
            self.sampler,
            "--steps",
            str(self.steps),
            "--guidance",
            f"{self.guidance:g}",
            "--seed",
            str(self.seed),
        ]
        if self.class_index is not None:
            words += ["--class", str(self.class_index)]  # the index: names may have been replaced by numbers
        if self.prompt:
            words += ["--prompt", self.prompt]
        if self.negative_prompt:
            words += ["--negative-prompt", self.negative_prompt]
        if self.interval is not None:
            words += ["--guidance-interval", *(f"{bound:g}" for bound in self.interval)]
        return shlex.join(words)

    def summary(self) -> dict:
        """The settings as plain data (shown with each result and saved in the download)."""
        values = {key: value for key, value in asdict(self).items() if key != "model"}
        values["guidance_interval"] = list(self.guidance_interval)
        return {
            "model": self.model.source,
            "step": self.model.pipe.step,
            **values,
            "class_name": self.class_name,
            "command": self.command(),
        }


def parse_settings(
    model: ServedModel,
    prompt: str | None,
    negative_prompt: str | None,
    class_choice: str | None,
    sampler: str | None,
    steps: float | None,
    guidance: float | None,
    interval_from: float | None,
    interval_to: float | None,
    seed: float | None,
    random_seed: bool,
    num: float | None,
) -> Settings:
    """Settings from the page's raw values (numbers arrive as floats or None)."""
    drawn = secrets.randbelow(2**31) if random_seed else _whole("Seed", seed)
    return Settings(
        model,
        prompt=prompt or "",
        negative_prompt=negative_prompt or "",
        class_index=_class_index(model, class_choice),
        sampler=sampler or "",
        steps=_whole("Steps", steps),
        guidance=_number("Guidance", guidance),
        guidance_interval=(_number("Guidance from", interval_from), _number("Guidance to", interval_to)),
        seed=drawn,
        num=_whole("Images", num),
    )


def _number(name: str, value: float | None) -> float:
    if value is None or isinstance(value, bool):
        raise SettingsError(f"{name}: enter a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name}: {value!r} is not a number") from None


def _whole(name: str, value: float | None) -> int:
    number = _number(name, value)
    if not math.isfinite(number) or number != int(number):
        raise SettingsError(f"{name}: must be a whole number, got {value}")
    return int(number)


def _class_index(model: ServedModel, choice: str | None) -> int | None:
    """A class by name or index; nothing (or the "every class" choice) cycles through them."""
    choice = (choice or "").strip()
    if not choice or choice == ALL_CLASSES:
        return None
    if not model.num_classes:
        raise SettingsError("Class: this model takes no class")
    if choice in model.class_names:
        return model.class_names.index(choice)
    if choice.isdigit():
        return int(choice)  # range checked by Settings
    raise SettingsError(f"Class: unknown class {choice!r}")
