"""The gradio page of ``mdm serve``: controls fitted to each model, the whole pyramid live, the
schedule, the denoising path, a download and the command line that repeats a result."""

from __future__ import annotations

import contextlib
import getpass
import logging
import math
import tempfile
import threading
import time
import uuid
from pathlib import Path

import gradio as gr

from ..diffusion import SAMPLERS, sampling_timesteps
from .catalog import ServedModel, describe
from .generation import Cancelled, Finished, stream
from .settings import ALL_CLASSES, Settings, SettingsError, parse_settings
from .visuals import (
    denoising_gif,
    keep_frame,
    pyramid_items,
    schedule_plot,
    strip,
    write_download,
)

log = logging.getLogger(__name__)
UPDATE_EVERY = 0.25
"""Seconds between live updates: the page cannot draw faster, the sampler may step faster."""
QUEUE_SIZE = 32
KEEP_RESULTS = 3600.0
"""Seconds a result's GIF and zip stay in the server's folder."""

INTRO = """# Matryoshka Diffusion
One diffusion process over an image pyramid: every level is denoised jointly, each on its own
noise schedule. Below you see all levels, live, as the sampler runs."""


def build_app(models: dict[str, ServedModel]) -> gr.Blocks:
    """The page over ``models`` (by source path); queued, one generation at a time."""
    if not models:
        raise ValueError("no models to serve")
    first = next(iter(models.values()))
    stops: dict[str, threading.Event] = {}  # session -> its running generation's stop signal
    # Results go to one temporary folder per user; gradio serves its own copies, so results
    # older than an hour are pruned as new ones come (also those left by a killed server).
    outputs = Path(tempfile.gettempdir()) / f"mdm-serve-{getpass.getuser()}"
    outputs.mkdir(mode=0o700, exist_ok=True)

    def find(source: str | None) -> ServedModel:
        if source is None:
            return first
        if source not in models:
            raise gr.Error(f"Model: {source!r} is not served here; choose one of {', '.join(models)}")
        return models[source]

    def plot(model: ServedModel, steps: int | None, current: int | None = None):
        try:
            timesteps = sampling_timesteps(model.pipe.process.num_steps, steps, model.pipe.config.sample.spacing)
        except (TypeError, ValueError):  # steps being typed: plot the curves without the sampler's dots
            timesteps = None
        return schedule_plot(model.pipe.process, model.sides, timesteps, current)

    with gr.Blocks(title="Matryoshka Diffusion", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                model = gr.Dropdown(
                    [(m.label, m.source) for m in models.values()], value=first.source, label="Model", elem_id="model"
                )
                about = gr.Markdown(describe(first), elem_id="about")
                prompt = gr.Textbox(label="Prompt", lines=2, visible=first.has_text, elem_id="prompt")
                negative = gr.Textbox(
                    label="Negative prompt (the unconditional side of guidance)",
                    visible=first.has_text,
                    elem_id="negative",
                )
                examples = gr.Dataset(
                    components=[prompt],
                    samples=[[p] for p in first.example_prompts] or [[""]],
                    label="Prompts from training",
                    type="values",
                    visible=bool(first.example_prompts),
                )
                class_choice = gr.Dropdown(
                    [ALL_CLASSES, *first.class_names],
                    value=ALL_CLASSES,
                    label="Class",
                    allow_custom_value=True,
                    visible=first.num_classes > 0,
                    elem_id="class",
                )
                sampler = gr.Dropdown(
                    list(SAMPLERS), value=first.pipe.config.sample.sampler, label="Sampler", elem_id="sampler"
                )
                steps = gr.Number(first.default_steps, label="Steps", elem_id="steps")
                guidance = gr.Number(
                    first.pipe.config.sample.guidance,
                    label="Guidance scale (1 = none)",
                    visible=first.conditional,
                    elem_id="guidance",
                )
                with gr.Accordion("Guidance interval", open=False, visible=first.conditional) as interval:
                    gr.Markdown("Guide only while t/T lies in this range (0 to 1 is every step).")
                    with gr.Row():
                        interval_from = gr.Number(0.0, label="from t/T", elem_id="interval-from")
                        interval_to = gr.Number(1.0, label="to t/T", elem_id="interval-to")
                with gr.Row():
                    seed = gr.Number(0, label="Seed", elem_id="seed")
                    random_seed = gr.Checkbox(False, label="Random seed", elem_id="random-seed")
                num = gr.Number(first.default_num, label=f"Images (1 to {first.max_num})", elem_id="num")
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column(scale=2):
                status = gr.Markdown("Ready.", label="Status", elem_id="status")
                pyramid = gr.Gallery(
                    label="Every level of the pyramid, highest resolution first",
                    columns=len(first.sides),
                    format="png",
                    object_fit="contain",
                    allow_preview=True,
                    elem_id="pyramid",
                )
                with gr.Row():
                    schedule = gr.Image(
                        plot(first, first.default_steps),
                        type="pil",
                        format="png",
                        interactive=False,
                        label="Noise schedule of each level (dots: the sampler's steps)",
                        height=340,
                        elem_id="schedule",
                    )
                    path = gr.Image(
                        type="filepath",
                        interactive=False,
                        height=340,
                        elem_id="path",
                        label="Denoising path: the x0 estimate of every level, step by step",
                    )
                command = gr.Code(
                    label="The same images from the command line",
                    language="shell",
                    interactive=False,
                    elem_id="command",
                )
                with gr.Accordion("Settings of this result", open=False):
                    details = gr.JSON(label="Settings of this result", elem_id="details")
                download = gr.File(
                    label="Download (every image of every level, grids, settings)",
                    interactive=False,
                    elem_id="download",
                )

        def choose_model(source: str):
            chosen = find(source)
            return (
                describe(chosen),
                gr.Textbox(visible=chosen.has_text),
                gr.Textbox(visible=chosen.has_text),
                gr.Dataset(
                    samples=[[p] for p in chosen.example_prompts] or [[""]], visible=bool(chosen.example_prompts)
                ),
                gr.Dropdown(
                    choices=[ALL_CLASSES, *chosen.class_names], value=ALL_CLASSES, visible=chosen.num_classes > 0
                ),
                chosen.pipe.config.sample.sampler,
                chosen.default_steps,
                gr.Number(
                    chosen.pipe.config.sample.guidance if chosen.conditional else 1.0, visible=chosen.conditional
                ),
                gr.Accordion(visible=chosen.conditional),
                gr.Number(chosen.default_num, label=f"Images (1 to {chosen.max_num})"),
                gr.Gallery(value=None, columns=len(chosen.sides)),
                plot(chosen, chosen.default_steps),
            )

        model.change(
            choose_model,
            [model],
            [
                about,
                prompt,
                negative,
                examples,
                class_choice,
                sampler,
                steps,
                guidance,
                interval,
                num,
                pyramid,
                schedule,
            ],
            api_visibility="private",
        )
        examples.click(lambda sample: sample[0], [examples], [prompt], api_visibility="private")
        steps.change(
            lambda source, value: plot(find(source), _maybe_int(value)),
            [model, steps],
            [schedule],
            api_visibility="private",
            trigger_mode="always_last",
        )

        def generate(
            model,
            prompt,
            negative_prompt,
            class_name,
            sampler,
            steps,
            guidance,
            guidance_from,
            guidance_to,
            seed,
            random_seed,
            num,
            request: gr.Request,
        ):
            chosen = find(model)
            try:
                settings = parse_settings(
                    chosen,
                    prompt,
                    negative_prompt,
                    class_name,
                    sampler,
                    steps,
                    guidance,
                    guidance_from,
                    guidance_to,
                    seed,
                    random_seed,
                    num,
                )
            except SettingsError as error:
                raise gr.Error(str(error), title="Check the settings") from None
            session = request.session_hash if request is not None else None
            signal = stops[session] = threading.Event()
            closed = False
            try:
                yield from _run(settings, signal)
            except GeneratorExit:
                # Stop's `cancels` may close this job before request_stop runs: the signal stays for it to find
                # (a flag, not signal.is_set(): stream() sets the signal whenever it ends).
                closed = True
                signal.set()
                raise
            finally:
                if not closed and stops.get(session) is signal:
                    del stops[session]

        def _run(settings: Settings, signal: threading.Event):
            chosen = settings.model
            summary = settings.summary()
            yield (
                f"Starting: seed {settings.seed}…",
                [],
                plot(chosen, settings.steps),
                None,
                summary["command"],
                summary,
                None,
            )
            frames, shown, started = [], 0.0, time.monotonic()
            try:
                for event in stream(settings, signal):
                    if isinstance(event, Finished):
                        break
                    if keep_frame(event.step, event.steps):
                        frames.append(strip(event.x0))
                    if time.monotonic() - shown >= UPDATE_EVERY or event.step == event.steps:
                        shown = time.monotonic()
                        yield (
                            f"Step {event.step} of {event.steps} (t = {event.t})",
                            pyramid_items(event.x0, f"x0 estimate at step {event.step}"),
                            plot(chosen, settings.steps, event.t),
                            gr.skip(),
                            gr.skip(),
                            gr.skip(),
                            gr.skip(),
                        )
            except Cancelled:
                yield "Stopped.", gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
                return
            except Exception as error:  # the page gets one line, the server log the traceback
                log.exception("generation failed")
                raise gr.Error(f"Generation failed: {str(error).splitlines()[0]}") from None
            _prune(outputs)
            name = uuid.uuid4().hex[:12]
            video = denoising_gif(frames, outputs / f"path-{name}.gif")
            archive = write_download(event.levels, summary, outputs / f"mdm-seed{settings.seed}-{name}.zip")
            seconds = time.monotonic() - started
            yield (
                f"Done in {seconds:.1f} s: {settings.num} images, seed {settings.seed}.",
                pyramid_items(event.levels, "level"),
                plot(chosen, settings.steps),
                str(video),
                summary["command"],
                summary,
                str(archive),
            )

        job = run.click(
            generate,
            [
                model,
                prompt,
                negative,
                class_choice,
                sampler,
                steps,
                guidance,
                interval_from,
                interval_to,
                seed,
                random_seed,
                num,
            ],
            [status, pyramid, schedule, path, command, details, download],
            api_name="generate",
        )

        def request_stop(request: gr.Request):
            signal = stops.pop(request.session_hash, None) if request is not None else None
            if signal is None:
                return "Nothing to stop."
            signal.set()
            return "Stopped."

        # Not limited: a stop must never wait in the queue behind the generation it stops.
        stop.click(request_stop, None, [status], cancels=[job], concurrency_limit=None, api_visibility="private")
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    return demo


def _prune(folder: Path, age: float = KEEP_RESULTS) -> None:
    """Delete results older than ``age`` seconds (gradio serves its own copies)."""
    cutoff = time.time() - age
    for old in folder.iterdir():
        with contextlib.suppress(FileNotFoundError):  # another server may prune at the same time
            if old.stat().st_mtime < cutoff:
                old.unlink()


def _maybe_int(value: float | None) -> int | None:
    return int(value) if value is not None and math.isfinite(value) and value == int(value) else None
