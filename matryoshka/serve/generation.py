"""Settings → a pipeline call, streamed: the x0 estimate at every level after each step, then the result."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import Tensor

from .settings import Settings


class Cancelled(Exception):
    """Raised inside the sampler's callback to end a run that the user stopped."""


@dataclass
class Frame:
    """The sampler's state after ``step`` of ``steps`` (1-based), at time t."""

    step: int
    steps: int
    t: int
    x0: list[Tensor]
    """The current clean-image estimate of every level, highest resolution first, in [-1, 1]."""


@dataclass
class Finished:
    levels: list[Tensor]
    """The final pyramid, highest resolution first, in [-1, 1]."""


def generate(settings: Settings, callback: Callable | None = None) -> list[Tensor]:
    """Sample the pyramid for ``settings`` exactly as ``mdm sample`` with ``settings.command()`` does."""
    pipe = settings.model.pipe
    num = settings.num
    labels = None if settings.class_index is None else [settings.class_index]
    prompts = [settings.prompt] * num if settings.prompt else None
    cond = pipe.condition(num, labels, prompts)
    uncond = pipe.negative(cond, settings.negative_prompt) if settings.negative_prompt else None
    options = {} if settings.interval is None else {"guidance_interval": settings.interval}
    return pipe.generate(
        num=num,
        sampler=settings.sampler,
        steps=settings.steps,
        guidance=settings.guidance,
        cond=cond,
        uncond=uncond,
        seed=settings.seed,
        callback=callback,
        **options,
    )


def stream(settings: Settings, stop: threading.Event | None = None) -> Iterator[Frame | Finished]:
    """Run :func:`generate` in a worker thread and yield a :class:`Frame` after every step, then
    :class:`Finished`. Setting ``stop`` (or closing the iterator) ends the run at the next step
    with :class:`Cancelled`; an error in the sampler is re-raised here."""
    stop = stop or threading.Event()
    events: queue.Queue = queue.Queue()

    def on_step(index: int, steps: int, t: int, x0: list[Tensor], _z: list[Tensor]) -> None:
        if stop.is_set():
            raise Cancelled("stopped")
        events.put(Frame(index + 1, steps, t, [level.clamp(-1, 1).cpu() for level in x0]))

    def work() -> None:
        try:
            events.put(Finished([level.cpu() for level in generate(settings, on_step)]))
        except BaseException as error:  # handed to the consumer, which re-raises it
            events.put(error)

    # A thread, because the sampler reports through a callback and a generator can only yield
    # from its own frame; daemon, so a stopped run never keeps the server from exiting.
    worker = threading.Thread(target=work, name="mdm-generate", daemon=True)
    worker.start()
    try:
        while True:
            event = events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, Finished):
                return
    finally:
        stop.set()
