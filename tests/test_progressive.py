"""Progressive training: growth preserves the inner model; stage boundaries resume exactly."""

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from matryoshka.checkpoints import CheckpointError
from matryoshka.cli.main import main
from matryoshka.config.presets import tiny, tiny_progressive
from matryoshka.config.run import StageConfig
from matryoshka.data.config import DataConfig
from matryoshka.models.presets import tiny as tiny_model
from matryoshka.training.trainer import Trainer

from .test_cli import make_image_folder, metrics


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def progressive_config(run: Path, folder: Path):
    config = tiny_progressive()
    return replace(
        config,
        run_dir=str(run),
        data=DataConfig(source="imagefolder", path=str(folder), resolution=16),
        stages=[StageConfig(levels=1, steps=3, batch_size=4), StageConfig(levels=2, steps=3, mixed_ratio=0.5)],
        train=replace(config.train, log_every=1, sample_every=100, checkpoint_every=100, keep_checkpoints=10),
    )


def test_growth_preserves_inner_predictions_weights_and_optimizer_state(tmp_path, folder):
    trainer = Trainer(progressive_config(tmp_path / "run", folder), quiet=True)
    for _ in range(3):
        trainer._ensure_stage()
        trainer._train_step()
        trainer.step += 1
    old_model, old_ema = copy.deepcopy(trainer.model).eval(), copy.deepcopy(trainer.ema.model)
    old_moment = next(iter(trainer.optimizer.state.values()))["exp_avg"].clone()
    trainer._ensure_stage()  # step 3 belongs to stage 1: the model grows to two levels
    assert trainer.num_levels == 2 and trainer.stage_index == 1

    z = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    t = torch.tensor([50.0, 700.0])
    with torch.no_grad():
        before = old_model([z[1]], t)[0]
        after = trainer.model.eval()(z, t)[1]
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    for name, value in old_ema.state_dict().items():
        torch.testing.assert_close(trainer.ema.model.state_dict()["inner_unet." + name], value, rtol=0, atol=0)
    first_inner = dict(trainer.model.named_parameters())["inner_unet." + next(iter(dict(old_model.named_parameters())))]
    torch.testing.assert_close(trainer.optimizer.state[first_inner]["exp_avg"], old_moment)

    # The grown level's average starts its own warm-up; the inner one continues its own.
    outer = [name for name in trainer.ema.model.state_dict() if not name.startswith("inner_unet.")]
    assert outer and trainer.ema.started == dict.fromkeys(outer, 3)
    name = next(n for n, p in trainer.model.named_parameters() if not n.startswith("inner_unet."))
    inner_name = "inner_unet." + next(iter(dict(old_model.named_parameters())))
    ema_before = {n: trainer.ema.model.state_dict()[n].clone() for n in (name, inner_name)}
    trainer._train_step()
    trained = dict(trainer.model.named_parameters())
    for key, decay in ((name, 1 / 10), (inner_name, 4 / 13)):  # (1 + n) / (10 + n) after n = 0 and 3 updates
        expected = decay * ema_before[key] + (1 - decay) * trained[key].detach()
        torch.testing.assert_close(trainer.ema.model.state_dict()[key], expected)
    # Held for ~100 steps, the grown level's average moves at decay >= 0.99 while its ramp is lower (n = 1),
    # and the inner level keeps its own ramp (n = 4).
    trainer.ema.grown_floor = 1 - 1 / 100
    ema_before = {n: trainer.ema.model.state_dict()[n].clone() for n in (name, inner_name)}
    trainer._train_step()
    trained = dict(trainer.model.named_parameters())
    for key, decay in ((name, 0.99), (inner_name, 5 / 14)):
        expected = decay * ema_before[key] + (1 - decay) * trained[key].detach()
        torch.testing.assert_close(trainer.ema.model.state_dict()[key], expected)


def test_the_grown_levels_ema_hold_reaches_the_average(tmp_path, folder):
    config = progressive_config(tmp_path / "run", folder)
    config = replace(config, train=replace(config.train, ema_grown_hold_steps=300))
    assert Trainer(config, quiet=True).ema.grown_floor == pytest.approx(1 - 1 / 300)
    with pytest.raises(ValueError, match="ema_grown_hold_steps"):
        replace(config.train, ema_grown_hold_steps=-1)


@pytest.mark.parametrize("freeze_inner", [False, True])
def test_progressive_run_resumes_exactly_at_stage_boundary(tmp_path, folder, freeze_inner):
    common = [
        "train.log_every=1",
        "train.sample_every=100",
        "train.checkpoint_every=100",
        "train.keep_checkpoints=10",
        "sample.steps=2",
        "sample.num=2",
        "data.source=imagefolder",
        f"data.path={folder}",
        "stages=[{levels: 1, steps: 3, batch_size: 4}, {levels: 2, steps: 3, mixed_ratio: 0.5}]",
        f"stages.1.freeze_inner={str(freeze_inner).lower()}",
    ]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(["train", "tiny-progressive", f"run_dir={straight}", *common]) == 0
    assert main(["train", "tiny-progressive", f"run_dir={stopped}", *common]) == 0
    # Leave the run as a stop right at the boundary would: only the step-3 checkpoint.
    shutil.rmtree(stopped / "checkpoints" / "step_00000006")
    (stopped / "checkpoints" / "latest").write_text("step_00000003\n")
    assert main(["train", "tiny-progressive", f"run_dir={stopped}", *common]) == 0

    a, b = metrics(straight), metrics(stopped)
    assert [m["levels"] for m in b] == [1, 1, 1, 2, 2, 2]
    np.testing.assert_allclose([m["loss"] for m in b], [m["loss"] for m in a], rtol=1e-5)
    for key, value in load_file(straight / "checkpoints/step_00000006/ema.safetensors").items():
        torch.testing.assert_close(load_file(stopped / "checkpoints/step_00000006/ema.safetensors")[key], value)
    history = json.loads((stopped / "stages.json").read_text())
    assert [(h["stage"], h["levels"], h["start_step"]) for h in history] == [(0, 1, 0), (1, 2, 3)]
    grown = load_file(stopped / "checkpoints/step_00000006/model.safetensors")
    for key, value in load_file(stopped / "checkpoints/step_00000003/model.safetensors").items():
        assert torch.equal(grown["inner_unet." + key], value) == freeze_inner, key

    # Each stage's checkpoint samples the levels that stage had.
    out = tmp_path / "out"
    assert (
        main(["sample", str(stopped / "checkpoints/step_00000003"), "--num", "2", "--steps", "2", "--out", str(out)])
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["8px", "grid_8px.png", "settings.json"]


def test_a_stage_with_minutes_ends_when_they_run_out_and_resumes_there(tmp_path, folder):
    common = [
        "train.log_every=1",
        "train.sample_every=100",
        "train.checkpoint_every=100",
        "train.keep_checkpoints=10",
        "sample.steps=2",
        "sample.num=2",
        "data.source=imagefolder",
        f"data.path={folder}",
        "stages=[{levels: 1, steps: 1000, minutes: 0.0005, batch_size: 4}, {levels: 2, steps: 3}]",
    ]
    run = tmp_path / "run"
    assert main(["train", "tiny-progressive", f"run_dir={run}", *common]) == 0
    history = json.loads((run / "stages.json").read_text())
    boundary = history[0]["end_step"]
    assert 1 <= boundary < 1000 and history[1]["start_step"] == boundary
    assert history[1]["start_seconds"] >= 0.03  # 0.0005 minutes
    first = metrics(run)
    assert [m["levels"] for m in first] == [1] * boundary + [2] * 3

    # Resumed from the boundary, the recorded end holds and stage 1 repeats its losses exactly.
    checkpoints = run / "checkpoints"
    for path in checkpoints.glob("step_*"):
        if path.name != f"step_{boundary:08d}":
            shutil.rmtree(path)
    (checkpoints / "latest").write_text(f"step_{boundary:08d}\n")
    assert main(["train", "tiny-progressive", f"run_dir={run}", *common]) == 0
    again = metrics(run)
    assert [m["levels"] for m in again] == [m["levels"] for m in first]
    np.testing.assert_allclose([m["loss"] for m in again], [m["loss"] for m in first], rtol=1e-5)


def test_init_from_loads_a_smaller_model_and_rejects_an_incompatible_one(tmp_path, folder):
    data = DataConfig(source="imagefolder", path=str(folder), resolution=8)
    small = replace(
        tiny(),
        run_dir=str(tmp_path / "small"),
        model=tiny_model(1),
        data=data,
        train=replace(tiny().train, steps=2, sample_every=100),
    )
    Trainer(small, quiet=True).train()

    big = replace(
        tiny(), run_dir=str(tmp_path / "big"), data=replace(data, resolution=16), init_from=str(tmp_path / "small")
    )
    trainer = Trainer(big, quiet=True)
    source = load_file(tmp_path / "small" / "checkpoints" / "step_00000002" / "ema.safetensors")
    for name, value in source.items():
        torch.testing.assert_close(trainer.model.state_dict()["inner_unet." + name], value, rtol=0, atol=0)

    wrong = replace(big, run_dir=str(tmp_path / "wrong"))
    wrong.model.levels[0] = replace(wrong.model.levels[0], channels=[16, 48])
    with pytest.raises(CheckpointError, match=r"wrong shape.*down_blocks\.1"):
        Trainer(wrong, quiet=True)


def test_a_grown_level_trains_at_its_own_rate(tmp_path, folder):
    config = progressive_config(tmp_path / "run", folder)
    config = replace(
        config,
        train=replace(config.train, warmup_steps=0),
        stages=[StageConfig(levels=1, steps=3, batch_size=4), StageConfig(levels=2, steps=3, lr=2e-4, grown_lr=6e-4)],
    )
    trainer = Trainer(config, quiet=True)
    assert len(trainer.optimizer.param_groups) == 1
    for _ in range(3):
        trainer._ensure_stage()
        trainer._train_step()
        trainer.step += 1
    trainer._ensure_stage()
    inner, grown = trainer.optimizer.param_groups
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert all(names[id(p)].startswith("inner_unet.") for p in inner["params"])
    assert grown["params"] and not any(names[id(p)].startswith("inner_unet.") for p in grown["params"])

    before = [p.detach().clone() for p in grown["params"]]
    trainer._train_step()
    assert (inner["lr"], grown["lr"]) == (2e-4, 6e-4)
    # Adam's first step moves a weight by at most the rate (after the decay), by the rate itself where the
    # gradient is far above eps (the grown level's fresh weights; those behind its zero output layer get none).
    decay = 1 - 6e-4 * grown["weight_decay"]
    moved = torch.cat([(p.detach() - old * decay).abs().flatten() for old, p in zip(before, grown["params"])])
    moved = moved[moved > 1e-6]
    assert len(moved) > 100 and moved.max() <= 6e-4 * 1.001 and moved.median() == pytest.approx(6e-4, rel=1e-3)


@pytest.mark.parametrize("grown_lr_before, grown_lr_after", [(None, 6e-4), (6e-4, None)])
def test_a_run_resumes_when_grown_lr_is_set_or_unset(tmp_path, folder, grown_lr_before, grown_lr_after):
    def config(grown_lr):
        base = progressive_config(tmp_path / "run", folder)
        stages = [StageConfig(levels=1, steps=3, batch_size=4), StageConfig(levels=2, steps=3, grown_lr=grown_lr)]
        return replace(base, stages=stages, train=replace(base.train, checkpoint_every=4))

    Trainer(config(grown_lr_before), quiet=True).train()
    checkpoints = tmp_path / "run" / "checkpoints"
    shutil.rmtree(checkpoints / "step_00000006")
    (checkpoints / "latest").write_text("step_00000004\n")
    trainer = Trainer(config(grown_lr_after), quiet=True)
    assert trainer.step == 4 and len(trainer.optimizer.param_groups) == (1 if grown_lr_after is None else 2)
    saved = torch.load(checkpoints / "step_00000004" / "state.pt", weights_only=True)["optimizer"]["state"]
    for name, parameter in trainer.model.named_parameters():
        torch.testing.assert_close(trainer.optimizer.state[parameter]["exp_avg"], saved[name]["exp_avg"])
    trainer.train()
    assert trainer.step == 6 and all(np.isfinite(m["loss"]) for m in metrics(tmp_path / "run"))


def test_the_first_stage_has_no_grown_lr():
    config = tiny_progressive()
    with pytest.raises(ValueError, match="grown_lr"):
        replace(config, stages=[replace(config.stages[0], grown_lr=1e-3), config.stages[1]])
    with pytest.raises(ValueError, match="grown_lr must be in"):
        StageConfig(levels=2, grown_lr=-1.0)
