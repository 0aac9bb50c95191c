"""Autoguidance: the guided combination, guide snapshots kept by training, and their use in sampling."""

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from matryoshka.checkpoints import CheckpointError
from matryoshka.cli.main import main
from matryoshka.config.presets import tiny_progressive
from matryoshka.config.run import SampleConfig, StageConfig
from matryoshka.data.config import DataConfig
from matryoshka.diffusion.autoguidance import Autoguided
from matryoshka.diffusion.samplers import sample_ddim
from matryoshka.guides import first_guide, guide_snapshots, is_guide_step, save_guide_snapshot, snapshot_levels
from matryoshka.models import NestedUNet
from matryoshka.models.presets import tiny as tiny_model
from matryoshka.pipeline import build_process, load_pipeline
from matryoshka.training.saving import write_guide_snapshot
from matryoshka.training.trainer import Trainer

from .test_cli import make_image_folder


class Constant(torch.nn.Module):
    """A pyramid model predicting one constant per level (and recording what it was given)."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values = values
        self.config = tiny_model(len(values))
        self.seen: list[int] = []
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, z, t, cond=None, **extra):
        self.seen = [zi.shape[-1] for zi in z]
        return [torch.full_like(zi, value) for zi, value in zip(z, self.values)]


def test_guided_outputs_are_weak_plus_weight_times_the_difference():
    z = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    guided = Autoguided(Constant([1.0, 2.0]), Constant([0.5, -1.0]), weight=3.0)
    top, inner = guided(z, torch.zeros(2))
    torch.testing.assert_close(top, torch.full_like(z[0], 0.5 + 3.0 * 0.5))
    torch.testing.assert_close(inner, torch.full_like(z[1], -1.0 + 3.0 * 3.0))
    # A guide from before the run grew sees only the inner level; the outer one is the strong model's.
    weak = Constant([-1.0])
    top, inner = Autoguided(Constant([1.0, 2.0]), weak, weight=2.0)(z, torch.zeros(2))
    assert weak.seen == [8]
    torch.testing.assert_close(top, torch.full_like(z[0], 1.0))
    torch.testing.assert_close(inner, torch.full_like(z[1], -1.0 + 2.0 * 3.0))
    with pytest.raises(ValueError, match="more than the model it guides"):
        Autoguided(Constant([1.0]), Constant([1.0, 2.0]), 2.0)


def test_guide_steps_double_and_the_first_is_the_automatic_guide(tmp_path):
    assert [s for s in range(1, 1100) if is_guide_step(s, 125)] == [125, 250, 500, 1000]
    assert not any(is_guide_step(s, 0) for s in range(5))
    weights = NestedUNet(tiny_model(1)).state_dict()
    for step in (125, 250, 500, 1000):
        save_guide_snapshot(tmp_path, step, weights, 1, ["a"])
    folder = tmp_path / "guides"
    assert list(guide_snapshots(folder)) == [125, 250, 500, 1000]
    assert snapshot_levels(folder / "step_00000500.safetensors") == 1
    assert first_guide(folder, 5000).name == first_guide(folder, 126).name == "step_00000125.safetensors"
    assert first_guide(folder, 125) is None  # a model does not guide itself
    assert first_guide(tmp_path / "none", 900) is None
    (folder / "step_00002000.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot read the guide snapshot"):
        snapshot_levels(folder / "step_00002000.safetensors")


def test_settings_refuse_bad_autoguidance():
    with pytest.raises(ValueError, match="autoguidance must be"):
        SampleConfig(autoguidance=-1.0)
    with pytest.raises(ValueError, match="autoguidance must be"):
        SampleConfig(autoguidance=math.nan)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A progressive tiny run with guide snapshots at steps 2 and 4 (one level) and 8 (two)."""
    root = tmp_path_factory.mktemp("autoguidance")
    folder = make_image_folder(root / "images")
    config = tiny_progressive()
    config = replace(
        config,
        run_dir=str(root / "run"),
        data=DataConfig(source="imagefolder", path=str(folder), resolution=16),
        stages=[StageConfig(levels=1, steps=4, batch_size=4), StageConfig(levels=2, steps=4)],
        train=replace(config.train, sample_every=100, checkpoint_every=100, guide_snapshots=2),
    )
    Trainer(config, quiet=True).train()
    return root / "run"


def test_training_keeps_guide_snapshots_of_the_ema(run):
    snapshots = guide_snapshots(run / "guides")
    assert list(snapshots) == [2, 4, 8]
    assert [snapshot_levels(path) for path in snapshots.values()] == [1, 1, 2]
    pipe = load_pipeline(run)
    assert pipe.step == 8 and pipe.guides == run / "guides"
    # The last snapshot is the EMA of the last step, which the checkpoint holds too.
    final = pipe.guide_model(pipe.sample_settings(autoguidance=2.0, guide="8"))
    for name, value in pipe.model.state_dict().items():
        torch.testing.assert_close(final.state_dict()[name], value, rtol=0, atol=0)


def test_autoguided_samples_match_their_closed_forms(run):
    pipe = load_pipeline(run)
    plain = pipe.generate(num=2, steps=3, seed=1)
    # Guided by itself, a model is unchanged at any weight; at weight 0 the guide alone samples.
    same = pipe.generate(num=2, steps=3, seed=1, autoguidance=3.0, guide="8")
    for a, b in zip(plain, same):
        torch.testing.assert_close(a, b)
    noise = pipe.process.initial_noise(2, 3, 16, generator=torch.Generator().manual_seed(1))
    weak = pipe.guide_model(pipe.sample_settings(autoguidance=2.0, guide="4"))
    assert weak.config.num_levels == 1
    by_weight_zero = sample_ddim(Autoguided(pipe.model, weak, 0.0), noise, pipe.process, 3)
    alone = sample_ddim(weak, noise[1:], build_process(pipe.config, num_levels=1), 3)
    torch.testing.assert_close(by_weight_zero[1], alone[0])
    # Automatic choice: the first snapshot; the outer level then follows the guided inner one.
    assert pipe.guide_path(pipe.sample_settings(autoguidance=2.0)).name == "step_00000002.safetensors"
    guided = pipe.generate(num=2, steps=3, seed=1, autoguidance=2.0)
    assert not torch.allclose(guided[1], plain[1])


def test_sampling_without_a_guide_warns_or_refuses(run, tmp_path):
    pipe = load_pipeline(run / "checkpoints" / "step_00000008")
    pipe.guides = tmp_path / "empty"
    with pytest.warns(UserWarning, match="not autoguided"):
        unguided = pipe.generate(num=2, steps=2, seed=1, autoguidance=2.0)
    torch.testing.assert_close(unguided[0], pipe.generate(num=2, steps=2, seed=1)[0])
    with pytest.raises(ValueError, match="no guide snapshot of that step"):
        pipe.generate(num=2, steps=2, autoguidance=2.0, guide="3")
    with pytest.raises(ValueError, match="no such guide snapshot"):
        pipe.generate(num=2, steps=2, autoguidance=2.0, guide=str(tmp_path / "missing"))


def test_cli_samples_and_evaluates_with_autoguidance(run, tmp_path, capsys):
    out = tmp_path / "samples"
    assert main(["sample", str(run), "--num", "2", "--steps", "2", "--autoguidance", "2", "--out", str(out)]) == 0
    assert (out / "grid_16px.png").is_file()
    chosen = json.loads((out / "settings.json").read_text())["autoguidance"]
    assert chosen == {"weight": 2.0, "guide": str(run / "guides" / "step_00000002.safetensors")}
    before = sorted((run / "samples").iterdir())
    assert main(["sample", str(run), "--num", "2", "--steps", "2", "--autoguidance", "2", "--guide", "5"]) != 0
    assert "no guide snapshot of that step (it has: 2, 4, 8)" in capsys.readouterr().err
    assert sorted((run / "samples").iterdir()) == before  # refused before any folder was made
    report = tmp_path / "report.json"
    guide = str(run / "guides" / "step_00000002.safetensors")
    code = main(
        ["eval", str(run), "--reference", "train", "--num", "4", "--metrics", "fd", "--feature", "effnet-lite0"]
        + ["--steps", "2", "--autoguidance", "2", "--guide", guide, "--out", str(report)]
    )
    assert code == 0
    sampling = json.loads(report.read_text())["sampling"]
    assert sampling["autoguidance"] == f"weight 2, guide {guide}"
    assert "/" not in Path(json.loads(report.read_text())["cache"]).name


def test_a_checkpoint_guides_only_a_model_with_the_same_diffusion(run, tmp_path):
    pipe = load_pipeline(run)
    by_snapshot = pipe.generate(num=2, steps=2, seed=1, autoguidance=2.0, guide="8")
    checkpoint = run / "checkpoints" / "step_00000008"
    by_checkpoint = pipe.generate(num=2, steps=2, seed=1, autoguidance=2.0, guide=str(checkpoint))
    for a, b in zip(by_snapshot, by_checkpoint):
        torch.testing.assert_close(a, b)
    other = tmp_path / "other"
    shutil.copytree(checkpoint, other)
    text = (other / "config.yaml").read_text()
    assert "  schedule: squaredcos\n" in text
    (other / "config.yaml").write_text(text.replace("  schedule: squaredcos\n", "  schedule: linear\n"))
    with pytest.raises(ValueError, match="cannot guide this model: its diffusion settings differ"):
        pipe.generate(num=2, steps=2, autoguidance=2.0, guide=str(other))


class Warnings:
    def __init__(self) -> None:
        self.messages: list[str] = []

    def warn(self, message: str) -> None:
        self.messages.append(message)


def test_a_snapshot_that_cannot_be_written_costs_only_itself(tmp_path):
    weights = NestedUNet(tiny_model(1)).state_dict()
    log = Warnings()
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run folder should be")
    write_guide_snapshot(blocker, 125, weights, 1, [], log)
    assert "could not write the guide snapshot of step 125" in log.messages[0]
    broken = {name: torch.full_like(value, math.nan) for name, value in weights.items()}
    write_guide_snapshot(tmp_path, 250, broken, 1, [], log)
    assert "no guide snapshot at step 250" in log.messages[1] and not (tmp_path / "guides").exists()
    write_guide_snapshot(tmp_path, 500, weights, 1, [], log)
    assert [path.name for path in (tmp_path / "guides").iterdir()] == ["step_00000500.safetensors"]  # no leftovers
