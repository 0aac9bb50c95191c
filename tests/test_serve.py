"""``mdm serve``: settings validation, generation at every level, visuals, start-up errors and the API."""

from __future__ import annotations

import math
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from matryoshka.cli.main import main
from matryoshka.serve.catalog import load_models
from matryoshka.serve.generation import Cancelled, Finished, Frame, generate, stream
from matryoshka.serve.settings import ALL_CLASSES, Settings, SettingsError, parse_settings
from matryoshka.serve.visuals import (
    denoising_gif,
    keep_frame,
    pyramid_items,
    schedule_plot,
    strip,
    write_download,
)
from matryoshka.utils.images import to_uint8

from .serve_runs import train_class_run, train_plain_run, train_text_run, train_video_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    return {"class": train_class_run(root), "text": train_text_run(root), "plain": train_plain_run(root)}


@pytest.fixture(scope="module")
def models(runs):
    loaded = load_models([str(path) for path in runs.values()])
    return {kind: loaded[str(path)] for kind, path in runs.items()}


def settings(model, **changes) -> Settings:
    values = {
        "prompt": "",
        "negative_prompt": "",
        "class_choice": None,
        "sampler": "ddim",
        "steps": 3,
        "guidance": 1.0,
        "interval_from": 0.0,
        "interval_to": 1.0,
        "seed": 0,
        "random_seed": False,
        "num": 2,
    }
    values.update(changes)
    return parse_settings(model, **values)


# ------------------------------------------------------------------ settings
@pytest.mark.parametrize(
    "changes, message",
    [
        ({"steps": 0}, "Steps: must be a whole number from 1 to 1000"),
        ({"steps": 2.5}, "Steps: must be a whole number"),
        ({"steps": None}, "Steps: enter a number"),
        ({"guidance": math.nan}, "Guidance: must be a number from 0 to 100"),
        ({"guidance": -1}, "Guidance: must be a number from 0 to 100"),
        ({"num": 17}, "Images: must be a whole number from 1 to 16"),
        ({"num": 0}, "Images: must be a whole number from 1 to 16"),
        ({"seed": -3}, "Seed: must be a whole number from 0"),
        ({"interval_from": 0.8, "interval_to": 0.2}, "Guidance interval: need 0 ≤ from ≤ to ≤ 1"),
        ({"sampler": "euler"}, "Sampler: unknown 'euler'"),
        ({"class_choice": "horses"}, "Class: unknown class 'horses'"),
        ({"class_choice": "5"}, "Class: choose one of the 2 classes"),
        ({"prompt": "a cat"}, "Prompt: this model takes no text"),
    ],
)
def test_invalid_settings_give_a_clear_message(models, changes, message):
    with pytest.raises(SettingsError) as error:
        settings(models["class"], **changes)
    assert str(error.value).startswith(message)


def test_text_model_needs_a_prompt_and_takes_no_class(models):
    with pytest.raises(SettingsError, match="Prompt: this is a text-to-image model, type a prompt"):
        settings(models["text"], prompt="   ")
    with pytest.raises(SettingsError, match="Class: this model takes no class"):
        settings(models["text"], prompt="red square", class_choice="cats")


def test_unconditional_model_takes_no_guidance_class_or_text(models):
    plain = models["plain"]
    assert not plain.conditional and plain.class_names == []
    with pytest.raises(SettingsError, match="Guidance: this model is unconditional, so guidance must stay 1"):
        settings(plain, guidance=3.0)
    with pytest.raises(SettingsError, match="Class: this model takes no class"):
        settings(plain, class_choice="cats")
    assert settings(plain, class_choice=ALL_CLASSES).command().endswith("--guidance 1 --seed 0")
    assert [level.shape[-1] for level in generate(settings(plain))] == [16, 8]


def test_classes_by_name_or_index_and_random_seeds(models):
    model = models["class"]
    assert model.class_names == ["cats", "dogs"]
    assert settings(model, class_choice="dogs").class_index == 1
    assert settings(model, class_choice="0").class_index == 0
    assert settings(model, class_choice=ALL_CLASSES).class_index is None
    seeds = {settings(model, random_seed=True, seed=None).seed for _ in range(4)}
    assert len(seeds) > 1 and all(0 <= s < 2**31 for s in seeds)


def test_models_describe_their_controls(models):
    text, classes = models["text"], models["class"]
    assert text.has_text and not text.num_classes and text.example_prompts == ["red square", "green star"]
    assert classes.num_classes == 2 and not classes.has_text and classes.conditional
    assert classes.sides == [16, 8]
    # On a CPU the defaults answer in seconds: the run's own (smaller) values or the CPU caps.
    assert classes.default_steps == 3 and classes.default_num <= 4 and classes.max_num == 16


# ------------------------------------------------------------------ generation
def test_generation_streams_every_level_and_is_reproducible(models):
    chosen = settings(models["class"], steps=3, num=3, seed=7, guidance=2.0, class_choice="cats")
    events = list(stream(chosen))
    frames, finished = events[:-1], events[-1]
    assert [f.step for f in frames] == [1, 2, 3] and all(isinstance(f, Frame) for f in frames)
    assert isinstance(finished, Finished)
    for levels in [f.x0 for f in frames] + [finished.levels]:
        assert [tuple(level.shape) for level in levels] == [(3, 3, 16, 16), (3, 3, 8, 8)]
        assert all(level.min() >= -1 and level.max() <= 1 for level in levels)
    again = generate(chosen)
    other = generate(settings(models["class"], steps=3, num=3, seed=8, guidance=2.0, class_choice="cats"))
    for a, b, c in zip(finished.levels, again, other):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_the_shown_command_makes_the_same_images(models, tmp_path):
    for case, chosen in enumerate(
        (
            settings(models["class"], class_choice="dogs", guidance=3.0, seed=5, sampler="ddpm"),
            settings(models["text"], prompt="green star", negative_prompt="red square", guidance=2.0, seed=3),
            settings(models["text"], prompt="red square", guidance=4.0, interval_from=0.5, interval_to=1.0, seed=4),
        )
    ):
        levels = generate(chosen)
        out = tmp_path / f"case{case}"
        assert main([*shlex.split(chosen.command())[1:], "--out", str(out)]) == 0
        for level in levels:
            side = level.shape[-1]
            for index, pixels in enumerate(to_uint8(level)):
                assert np.array_equal(np.asarray(Image.open(out / f"{side}px" / f"{index:04d}.png")), pixels)


def test_text_generation_with_guidance_interval(models):
    chosen = settings(models["text"], prompt="red square", guidance=4.0, interval_from=0.5, interval_to=1.0)
    assert chosen.interval == (0.5, 1.0) and "--guidance-interval 0.5 1" in chosen.command()
    full = generate(settings(models["text"], prompt="red square", guidance=4.0))
    assert not torch.equal(generate(chosen)[0], full[0])


def test_stop_ends_the_run_at_the_next_step(models):
    stop = threading.Event()
    runner = stream(settings(models["class"], steps=200), stop)
    assert isinstance(next(runner), Frame)
    stop.set()
    with pytest.raises(Cancelled):
        for event in runner:
            assert isinstance(event, Frame)


# ------------------------------------------------------------------ visuals
def test_schedule_plot_video_and_download(models, tmp_path):
    model = models["class"]
    plot = schedule_plot(model.pipe.process, model.sides, [1000, 500, 0], current=500)
    assert plot.size == (480, 300) and len(np.unique(np.asarray(plot).reshape(-1, 3), axis=0)) > 3
    assert [keep_frame(s, 200) for s in (1, 3, 4, 199, 200)] == [False, False, True, False, True]
    levels = generate(settings(model, num=3))
    frames = [strip([level * scale for level in levels]) for scale in (1.0, 0.5, 0.0)]
    assert frames[0].width > frames[0].height  # the levels side by side
    gif = Image.open(denoising_gif(frames, tmp_path / "path.gif"))
    assert gif.n_frames == 3
    chosen = settings(model, num=3)
    archive = zipfile.ZipFile(write_download(levels, chosen.summary(), tmp_path / "out.zip"))
    names = set(archive.namelist())
    assert {"16px/0002.png", "8px/0000.png", "grid_16px.png", "grid_8px.png", "settings.json", "command.txt"} <= names
    assert archive.read("command.txt").decode().startswith("mdm sample ")


# ------------------------------------------------------------------ start-up errors
def test_unservable_runs_fail_at_start_with_one_line(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    subprocess.run(["cp", "-r", str(runs["class"]), str(corrupt)], check=True)
    for weights in corrupt.glob("checkpoints/step_*/ema.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])
    no_encoder = tmp_path / "no_encoder"
    subprocess.run(["cp", "-r", str(runs["text"]), str(no_encoder)], check=True)
    for config in no_encoder.glob("checkpoints/step_*/config.yaml"):
        config.write_text(config.read_text().replace("encoder: minilm", f"encoder: {tmp_path / 'no-such-encoder'}"))
    for path, reason in [
        (tmp_path / "missing", "no such run"),
        (empty, "no complete checkpoint"),
        (corrupt, "cannot read weights"),
        (no_encoder, "no-such-encoder"),
    ]:
        assert main(["serve", str(path), "--port", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"mdm serve: error: cannot serve {path}: ") and reason in err
        assert err.count("\n") == 1


def test_old_results_are_pruned(tmp_path):
    from matryoshka.serve.app import KEEP_RESULTS, _prune

    old, new = tmp_path / "old.zip", tmp_path / "new.zip"
    old.write_bytes(b"x")
    new.write_bytes(b"x")
    os.utime(old, (time.time() - KEEP_RESULTS - 10,) * 2)
    _prune(tmp_path)
    assert not old.exists() and new.exists()


def test_import_matryoshka_does_not_import_gradio():
    code = "import sys, matryoshka, matryoshka.cli.main, matryoshka.pipeline; assert 'gradio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_serve_listens_on_localhost_by_default():
    from matryoshka.cli.main import build_parser

    args = build_parser().parse_args(["serve", "runs/a", "runs/b"])
    assert (args.models, args.host, args.port) == (["runs/a", "runs/b"], "127.0.0.1", 7860)


# ------------------------------------------------------------------ the API
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(runs, models):
    from matryoshka.serve.app import build_app

    demo = build_app({m.source: m for m in models.values()})
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_generate_api_endpoint(server, models):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(server, verbose=False)
    source = models["class"].source
    status, pyramid, schedule, path, command, details, download = client.predict(
        model=source,
        prompt="",
        negative_prompt="",
        class_name="dogs",
        sampler="ddim",
        steps=3,
        guidance=2.0,
        guidance_from=0.0,
        guidance_to=1.0,
        seed=11,
        random_seed=False,
        num=2,
        api_name="/generate",
    )
    assert status.startswith("Done") and "seed 11" in status
    assert [item["caption"] for item in pyramid] == ["16² level", "8² level"]
    # Each level is one grid of the 2 images (2 px padding), enlarged 8x / 16x so every image is 128 px wide.
    assert [Image.open(item["image"]).size for item in pyramid] == [(38 * 8, 20 * 8), (22 * 16, 12 * 16)]
    assert Image.open(schedule).size == (480, 300) and Image.open(path).n_frames == 3
    assert command == f"mdm sample {source} --num 2 --sampler ddim --steps 3 --guidance 2 --seed 11 --class 1"
    assert details["seed"] == 11 and details["class_name"] == "dogs"
    assert "settings.json" in zipfile.ZipFile(download).namelist()

    with pytest.raises(AppError, match="Steps: must be a whole number from 1 to 1000, got 0"):
        client.predict(
            model=source,
            prompt="",
            negative_prompt="",
            class_name=ALL_CLASSES,
            sampler="ddim",
            steps=0,
            guidance=1.0,
            guidance_from=0.0,
            guidance_to=1.0,
            seed=0,
            random_seed=False,
            num=2,
            api_name="/generate",
        )
    status, *_ = client.predict(
        model=models["text"].source,
        prompt="red square",
        negative_prompt="",
        class_name=None,
        sampler="dpm++2m",
        steps=2,
        guidance=1.0,
        guidance_from=0.0,
        guidance_to=1.0,
        seed=0,
        random_seed=True,
        num=1,
        api_name="/generate",
    )
    assert status.startswith("Done")


def test_video_runs_show_their_clips_at_every_level(tmp_path_factory, tmp_path):
    model = next(iter(load_models([str(train_video_run(tmp_path_factory.mktemp("video")))]).values()))
    levels = generate(settings(model, num=2))
    assert [tuple(level.shape) for level in levels] == [(2, 3, 4, 16, 16), (2, 3, 2, 8, 8)]
    items = pyramid_items(levels, "samples")
    assert [caption for _, caption in items] == ["4 frames 16² samples", "2 frames 8² samples"]
    grid = items[0][0]  # one row of frames per clip
    assert grid.width > 1.5 * grid.height
    assert strip(levels).width > strip(levels).height
    archive = zipfile.ZipFile(write_download(levels, settings(model, num=2).summary(), tmp_path / "clips.zip"))
    names = set(archive.namelist())
    assert {"4x16x16px/0001_frame03.png", "2x8x8px/0000_frame01.png", "grid_4x16x16px.png"} <= names
