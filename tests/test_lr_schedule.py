"""Learning-rate schedules: closed forms, and the time budget of time-limited stages and runs."""

import math
from dataclasses import replace

import pytest

from matryoshka.config.presets import tiny_progressive
from matryoshka.config.run import StageConfig
from matryoshka.data.config import DataConfig
from matryoshka.training.lr import lr_factor
from matryoshka.training.trainer import Trainer

from .test_cli import make_image_folder


def test_warmup_then_each_decay_in_closed_form():
    assert lr_factor(0, 10, 0.0, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 10, 0.0, "cosine") == pytest.approx(1.0)
    for progress in (0.0, 0.25, 0.5, 1.0):
        assert lr_factor(20, 10, progress, "constant") == 1.0
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        assert lr_factor(20, 10, progress, "cosine", 0.1) == pytest.approx(cosine)
        assert lr_factor(20, 10, progress, "linear", 0.0) == pytest.approx(1 - progress)
    assert lr_factor(20, 10, 3.0, "linear", 0.2) == pytest.approx(0.2)  # past the budget: the floor
    # cooldown: constant through the first 1 - c of the budget, then linear to the floor over the last c
    for progress, factor in ((0.0, 1.0), (0.7, 1.0), (0.75, 1.0), (0.8, 0.8), (0.95, 0.2), (1.0, 0.0)):
        assert lr_factor(20, 10, progress, "cooldown", 0.0, 0.25) == pytest.approx(factor)
    assert lr_factor(20, 10, 0.9, "cooldown", 0.5, 0.2) == pytest.approx(0.75)
    assert lr_factor(20, 10, 1.0, "cooldown", 0.1, 0.0) == 1.0  # no cooldown share: constant
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_factor(20, 10, 0.5, "step")


@pytest.fixture()
def trainer(tmp_path):
    config = tiny_progressive()
    config = replace(
        config,
        run_dir=str(tmp_path / "run"),
        data=DataConfig(source="imagefolder", path=str(make_image_folder(tmp_path / "images")), resolution=16),
        stages=[StageConfig(levels=1, steps=1000, minutes=1.0), StageConfig(levels=2, steps=1000)],
        train=replace(config.train, steps=2000, warmup_steps=0, lr_schedule="linear", min_lr_ratio=0.0),
    )
    trainer = Trainer(config, quiet=True)
    trainer._ensure_stage()
    return trainer


def test_progress_is_the_larger_of_steps_and_minutes(trainer):
    trainer.step = 100
    assert trainer._stage_progress() == pytest.approx(0.1)  # steps: no time limit reached yet
    trainer.train_seconds = 30.0
    assert trainer._stage_progress() == pytest.approx(0.5)  # half of the stage's minute
    trainer.run_end_seconds = 40.0
    assert trainer._stage_progress() == pytest.approx(0.75)  # the run's deadline comes first
    trainer.train_seconds = 45.0
    assert trainer._stage_progress() >= 1.0
    assert lr_factor(trainer.step, 0, trainer._stage_progress(), "linear", 0.0) == 0.0
