"""benchmarks/posthoc_ema.py: replaying the trainer's EMA from raw weights reproduces it exactly."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from matryoshka.checkpoints import list_checkpoints
from matryoshka.config.presets import load_run_config
from matryoshka.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def posthoc():
    spec = importlib.util.spec_from_file_location("posthoc_ema", ROOT / "benchmarks" / "posthoc_ema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def grown_run(tmp_path_factory):
    """tiny-progressive (8² alone for 10 steps, then 16²/8² for 10) with a checkpoint after every step, its
    grown level's average held (decay >= 0.8, above the restarted ramp's 0.1-0.53 in those 10 steps)."""
    run = tmp_path_factory.mktemp("posthoc") / "run"
    overrides = [f"run_dir={run}", "train.checkpoint_every=1", "train.keep_checkpoints=1000", "train.sample_every=1000"]
    overrides += ["train.ema_grown_hold_steps=5", "train.guide_snapshots=5"]
    Trainer(load_run_config("tiny-progressive", overrides), quiet=True).train()
    return run


def test_replaying_the_trainers_settings_over_every_step_gives_its_own_average(posthoc, grown_run, monkeypatch):
    last = list_checkpoints(grown_run)[-1]
    own = load_file(last / "ema.safetensors")
    out = grown_run.parent / "spans"
    settings = ["--grown", "--hold-steps", "5", "--spans", "10", "none", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["posthoc_ema", str(grown_run), *settings])
    posthoc.main()
    replayed = load_file(out / "span_10_hold5" / "checkpoints" / last.name / "ema.safetensors")
    assert replayed.keys() == own.keys()
    # A run-shaped folder whose guides are the run's, so mdm eval autoguides the replayed average as the run.
    assert (out / "span_10_hold5" / "guides").resolve() == (grown_run / "guides").resolve()
    assert list((out / "span_10_hold5" / "guides").iterdir())
    for name in own:  # the grown level from its rebuilt initial weights, the inner one kept
        torch.testing.assert_close(replayed[name], own[name], rtol=1e-5, atol=1e-6)
    start, since = posthoc.grown_start(grown_run, last)
    assert since == 10 and start and not any(name.startswith("inner_unet.") for name in start)
    # No warm-up: every update keeps 0.999 of the average, from the initial weights on.
    held = load_file(out / "span_none_hold5" / "checkpoints" / last.name / "ema.safetensors")
    for name, initial in start.items():
        average = initial.double()
        for checkpoint in list_checkpoints(grown_run)[-10:]:
            average = 0.999 * average + 0.001 * load_file(checkpoint / "model.safetensors")[name].double()
        torch.testing.assert_close(held[name].double(), average, rtol=1e-5, atol=1e-7)
