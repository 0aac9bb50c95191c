"""Joint image and video training: images mixed into a video run's batches as one-frame clips."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from matryoshka.cli.main import main
from matryoshka.config.presets import load_run_config
from matryoshka.data.emoji import EmojiDataset
from matryoshka.diffusion.process import MatryoshkaDiffusion
from matryoshka.diffusion.schedules import squaredcos
from matryoshka.models import NestedUNet
from matryoshka.models.presets import tiny, tiny_video
from matryoshka.models.temporal import is_temporal_parameter
from matryoshka.training.trainer import Trainer

FAST = ["train.log_every=1", "train.sample_every=1000", "train.warmup_steps=1", "sample.steps=2", "sample.num=2"]
IMAGES = ["data.image_source=emoji", "data.image_fraction=0.5"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model


class Recorder(nn.Module):
    """The trainer's network, noting the shapes of every call and which pass the gradients come from."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[list[tuple[int, ...]]] = []
        self.grads: dict[str, list[int]] = {}  # parameter -> frame counts of the passes that gave it a gradient
        for name, parameter in model.named_parameters():
            parameter.register_hook(lambda grad, name=name: self.grads.setdefault(name, []).append(self.frames))

    @property
    def frames(self) -> int:
        return self.calls[-1][0][2]

    def forward(self, z, t, cond=None):
        self.calls.append([tuple(level.shape) for level in z])
        return self.model(z, t, cond)


def test_image_batches_reach_the_model_as_one_frame_clips_and_leave_temporal_layers_alone(tmp_path):
    config = load_run_config("tiny-video", [f"run_dir={tmp_path / 'run'}", *IMAGES, *FAST])
    trainer = Trainer(config, quiet=True)
    assert isinstance(trainer.images.dataset, EmojiDataset) and trainer.images.dataset.cfg.resolution == 16
    trainer._ensure_stage()
    recorder = trainer.network = Recorder(trainer.model)
    trainer._train_step()
    # Half of the batch of 4 is images, as clips of one frame at every level, before the clips.
    assert recorder.calls == [[(2, 3, 1, 16, 16), (2, 3, 1, 8, 8)], [(2, 3, 4, 16, 16), (2, 3, 2, 8, 8)]]
    temporal = {name: passes for name, passes in recorder.grads.items() if is_temporal_parameter(name)}
    spatial = {name: passes for name, passes in recorder.grads.items() if not is_temporal_parameter(name)}
    assert temporal and all(passes == [4] for passes in temporal.values())
    every = [name for name, _ in trainer.model.named_parameters() if not is_temporal_parameter(name)]
    assert sorted(spatial) == sorted(every) and all(passes == [1, 4] for passes in spatial.values())


def test_an_image_batch_trains_the_video_model_as_its_image_model():
    """Same loss and spatial gradients as the image model on the images; no gradient for temporal layers."""
    image = randomize(NestedUNet(tiny(2)))
    video = randomize(NestedUNet(tiny_video()), seed=3)  # temporal layers non-zero: they would change the output
    video.load_state_dict(image.state_dict(), strict=False)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    t = torch.tensor([5, 300, 900])
    noise = [torch.randn(3, 3, 16, 16), torch.randn(3, 3, 8, 8)]
    image_loss, _ = MatryoshkaDiffusion(squaredcos(), 2, factor=2).loss(image, images, t=t, noise=noise)
    one_frame = MatryoshkaDiffusion(squaredcos(), 2, factor=2, frames=[1, 1])
    clip_noise = [level[:, :, None] for level in noise]
    video_loss, logs = one_frame.loss(video, images[:, :, None], t=t, noise=clip_noise)
    assert sorted(logs) == ["loss/1x16x16", "loss/1x8x8"]
    torch.testing.assert_close(video_loss, image_loss, rtol=0, atol=0)
    image_loss.backward()
    video_loss.backward()
    image_grads = dict(image.named_parameters())
    for name, parameter in video.named_parameters():
        if is_temporal_parameter(name):
            assert parameter.grad is None, name
        else:
            torch.testing.assert_close(parameter.grad, image_grads[name].grad, rtol=0, atol=0, msg=name)


def test_tiny_video_with_images_trains_and_resumes_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    options = [*IMAGES, *FAST, "train.checkpoint_every=2", "train.grad_accum=2", "diffusion.upsampled_residual=true"]
    assert main(["train", "tiny-video", f"run_dir={straight}", "train.steps=4", *options]) == 0
    assert main(["train", "tiny-video", f"run_dir={resumed}", "train.steps=2", *options]) == 0
    assert main(["train", "tiny-video", f"run_dir={resumed}", "train.steps=4", *options]) == 0
    a, b = metrics(straight), metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    keys = ("loss", "loss/4x16x16", "loss/2x8x8", "loss/1x16x16", "loss/1x8x8", "grad_norm")
    for key in keys:
        np.testing.assert_allclose([m[key] for m in b], [m[key] for m in a], rtol=1e-5, err_msg=key)
    for m in a:  # half images, half clips: the step's loss is the mean of the two halves' losses
        halves = m["loss/1x16x16"] + m["loss/1x8x8"], m["loss/4x16x16"] + m["loss/2x8x8"]
        assert m["loss"] == pytest.approx(sum(halves) / 2, rel=1e-6)
    state = torch.load(resumed / "checkpoints/step_00000004/state.pt", weights_only=True)
    assert state["data"]["images"]["batch_size"] == 2 and state["data"]["batch_size"] == 2
    # Without images the same run trains on other samples: the images were really in the batches.
    plain = tmp_path / "plain"
    assert main(["train", "tiny-video", f"run_dir={plain}", "train.steps=1", *options[2:]]) == 0
    assert metrics(plain)[0]["loss"] != a[0]["loss"] and "loss/1x16x16" not in metrics(plain)[0]


def test_progressive_video_run_with_images(tmp_path):
    """The inner stage takes the images at its own side, still one frame."""
    run = tmp_path / "progressive"
    stages = "stages=[{levels: 1, steps: 1}, {levels: 2}]"
    assert main(["train", "tiny-video", f"run_dir={run}", "train.steps=2", stages, *IMAGES, *FAST]) == 0
    assert [sorted(k for k in m if k.startswith("loss/")) for m in metrics(run)] == [
        ["loss/1x8x8", "loss/2x8x8"],
        ["loss/1x16x16", "loss/1x8x8", "loss/2x8x8", "loss/4x16x16"],
    ]


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        ("tiny-video", ["data.image_fraction=0.5"], "image_source must name an image source"),
        ("tiny-video", ["data.image_source=emoji"], "image_fraction must be > 0"),
        ("tiny-video", ["data.image_source=emoji-motion", "data.image_fraction=0.5"], "image_source must be one of"),
        ("tiny-video", ["data.image_source=imagefolder", "data.image_fraction=0.5"], "image_path is required"),
        ("tiny-video", ["data.image_source=emoji", "data.image_fraction=1"], r"image_fraction must be a number in"),
        ("tiny-video", ["data.image_source=emoji", "data.image_fraction=0.1"], "gives 0 images and 4 clips"),
        ("tiny-video", ["data.image_path=x"], "image_path is set but data.image_source is not"),
        ("tiny", IMAGES, "needs a video source"),
    ],
)
def test_joint_training_settings_are_checked(preset, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(preset, overrides)
