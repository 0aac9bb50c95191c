"""Tiny runs for the web tests (class-conditional, text, unconditional), trained for two steps."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from matryoshka.cli.main import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # MiniLM ships inside a package: never touch the network

CAPTIONS = ["red square", "blue circle", "green star"]
FAST = ["train.steps=2", "train.warmup_steps=1", "train.sample_every=1000", "train.log_every=1", "sample.steps=3"]


def make_images(root: Path) -> Path:
    """Twelve 16² images in two class folders, each with a caption sidecar."""
    rng = np.random.default_rng(0)
    for index in range(12):
        folder = root / ("cats" if index % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(CAPTIONS[index % 3])
    return root


def train_class_run(root: Path) -> Path:
    images, run = make_images(root / "images"), root / "class"
    assert (
        main(
            [
                "train",
                "tiny",
                f"run_dir={run}",
                "data.source=imagefolder",
                f"data.path={images}",
                "data.label=folder",
                "model.num_classes=2",
                *FAST,
            ]
        )
        == 0
    )
    return run


def train_plain_run(root: Path) -> Path:
    """Unconditional."""
    images, run = make_images(root / "plain-images"), root / "plain"
    assert main(["train", "tiny", f"run_dir={run}", "data.source=imagefolder", f"data.path={images}", *FAST]) == 0
    return run


def train_text_run(root: Path) -> Path:
    images, run = make_images(root / "captioned"), root / "text"
    assert (
        main(
            [
                "train",
                "tiny",
                f"run_dir={run}",
                "data.source=imagefolder",
                f"data.path={images}",
                "model.text_dim=384",
                "text.encoder=minilm",
                "text.max_length=16",
                "data.captions=true",
                f"text.cache_dir={root / 'cache'}",
                "sample.prompts=[red square, green star]",
                *FAST,
            ]
        )
        == 0
    )
    return run


def train_video_run(root: Path) -> Path:
    run = root / "video"
    assert main(["train", "tiny-video", f"run_dir={run}", *FAST]) == 0
    return run
