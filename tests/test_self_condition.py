"""Self-conditioning (model.self_condition): the model's input, the training loss's two passes, the samplers."""

import copy

import pytest
import torch

from matryoshka.cli.main import main
from matryoshka.diffusion.process import MatryoshkaDiffusion, first_samples
from matryoshka.diffusion.samplers import SAMPLERS
from matryoshka.diffusion.schedules import squaredcos
from matryoshka.models import Conditioning, NestedUNet
from matryoshka.models.presets import tiny
from matryoshka.pipeline import load_pipeline

from .test_cli import make_image_folder, metrics


def randomised(model: NestedUNet) -> NestedUNet:
    """Zero-initialised output layers make every output 0: give all weights random values."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def pyramid(batch: int = 2) -> list[torch.Tensor]:
    return [torch.randn(batch, 3, 16, 16), torch.randn(batch, 3, 8, 8)]


def test_model_takes_an_estimate_per_level_and_zeros_without_one():
    config = tiny(2)
    config.self_condition = True
    model = randomised(NestedUNet(config))
    assert model.conv_in.in_channels == 6 and model.inner_unet.conv_in.in_channels == 6
    z, t = pyramid(), torch.tensor([10.0, 500.0])
    with torch.no_grad():
        implicit = model(z, t)
        zeros = model(z, t, self_cond=[torch.zeros_like(level) for level in z])
        estimate = model(z, t, self_cond=[level.clamp(-1, 1) for level in z])
    for a, b, c in zip(implicit, zeros, estimate):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert (a - c).abs().max() > 1e-3  # the estimate reaches every level's output

    with pytest.raises(ValueError, match="self_cond must match"):
        model(z, t, self_cond=[z[0]])
    with pytest.raises(ValueError, match="not self-conditioning"):
        NestedUNet(tiny(2))(z, t, self_cond=z)


class Recorder(torch.nn.Module):
    """pred = 0.5 z per level; records every call's batch and self-conditioning input."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, z_list, t_model, cond, self_cond=None):
        self.calls.append(([z.clone() for z in z_list], t_model.clone(), cond, self_cond))
        return [0.5 * z for z in z_list]


@pytest.mark.parametrize("mixed_ratio", [None, 0.5, 0.25])
def test_loss_feeds_the_first_half_its_own_clipped_estimate_without_gradient(mixed_ratio):
    process = MatryoshkaDiffusion(squaredcos(), num_levels=2, factor=2, self_condition=True, mixed_ratio=mixed_ratio)
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    labels = torch.arange(8)
    model = Recorder()
    process.loss(model, x, cond=labels, generator=torch.Generator().manual_seed(0))
    (first, t_first, cond_first, none), (z, t, cond, self_cond) = model.calls
    top = process.top_batch(8)  # every level trains with and without an estimate, the top one too
    assert none is None and [level.shape[0] for level in first] == [top // 2, 4]
    torch.testing.assert_close(t_first, t[:4])
    assert cond_first.tolist() == [0, 1, 2, 3] and cond.tolist() == list(range(8))
    for level, (estimate, noisy) in enumerate(zip(self_cond, z)):
        assert estimate.shape == noisy.shape and not estimate.requires_grad
        half = first[level].shape[0]
        alpha, sigma = process.coefficients(level, (t[:half] + 1).long(), noisy[:half])
        expected = (alpha * noisy[:half] - sigma * 0.5 * noisy[:half]).clamp(-1, 1)  # x0 from v = 0.5 z
        torch.testing.assert_close(estimate[:half], expected)
        assert not estimate[half:].any()


def test_without_self_conditioning_the_loss_makes_one_call_and_passes_no_estimate():
    process = MatryoshkaDiffusion(squaredcos(), num_levels=2, factor=2)
    model = Recorder()
    process.loss(model, torch.zeros(4, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    assert len(model.calls) == 1 and model.calls[0][3] is None


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_feed_the_previous_steps_clipped_estimate(name, guidance):
    process = MatryoshkaDiffusion(squaredcos(), num_levels=2, factor=2, self_condition=True)
    model, reported = Recorder(), []
    noise = process.initial_noise(3, 3, 16, generator=torch.Generator().manual_seed(1))
    cond = torch.arange(3) if guidance != 1.0 else None
    uncond = torch.full((3,), -1) if guidance != 1.0 else None
    SAMPLERS[name](
        model, noise, process, 4, cond=cond, uncond=uncond, guidance=guidance,
        generator=torch.Generator().manual_seed(2), callback=lambda i, n, t, x0, z: reported.append(x0),
        clip_x0=False,  # the model is still fed estimates clipped as in training
    )  # fmt: skip
    assert model.calls[0][3] is None  # nothing to condition on at the first step
    for (_, _, _, fed), x0 in zip(model.calls[1:], reported):
        copies = 2 if guidance != 1.0 else 1  # the guided pair gets the same estimate twice
        for level, estimate in zip(fed, x0):
            torch.testing.assert_close(level, estimate.clamp(-1, 1).repeat(copies, 1, 1, 1), rtol=0, atol=0)


def test_first_samples_of_each_kind_of_conditioning():
    cond = Conditioning(labels=torch.arange(4), text=torch.randn(4, 5, 2), micro={"scale": torch.arange(4.0)})
    head = cond.head(2)
    assert head.labels.tolist() == [0, 1] and head.text.shape == (2, 5, 2) and head.text_mask.shape == (2, 5)
    assert head.micro["scale"].tolist() == [0.0, 1.0]
    assert first_samples(None, 2) is None and first_samples(torch.arange(4), 3).tolist() == [0, 1, 2]
    with pytest.raises(TypeError, match="first samples"):
        first_samples(object(), 1)


def test_training_progressive_growth_and_sampling_with_self_conditioning(tmp_path, capsys):
    run = tmp_path / "run"
    folder = make_image_folder(tmp_path / "images")
    data = ["data.source=imagefolder", f"data.path={folder}"]
    stages = "stages=[{levels: 1, steps: 2}, {levels: 2}]"
    common = ["tiny", f"run_dir={run}", "model.self_condition=true", stages, *data]
    assert main(["train", *common, "train.steps=4", "train.log_every=1", "train.sample_every=100"]) == 0
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4]
    pipe = load_pipeline(run)
    assert pipe.process.self_condition and pipe.model.conv_in.in_channels == 6
    images = pipe.generate(num=2, steps=3, seed=0)
    assert images[0].shape == (2, 3, 16, 16) and torch.isfinite(images[0]).all()

    capsys.readouterr()
    plain = ["tiny", f"run_dir={tmp_path / 'plain'}", f"init_from={run}", "train.steps=1", *data]
    assert main(["train", *plain]) != 0
    error = capsys.readouterr().err
    assert "trained with model.self_condition=true" in error and "Set model.self_condition=true" in error
    assert main(["train", *plain, "model.self_condition=true", "train.sample_every=100"]) == 0


def test_normalised_input_is_divided_by_the_noisy_channels_std_only():
    config = tiny(1)
    config.self_condition = True
    config.levels[0].normalize_input = True
    normalised = randomised(NestedUNet(config))
    plain_config = copy.deepcopy(config)  # the model keeps its config: change a copy
    plain_config.levels[0].normalize_input = False
    plain = NestedUNet(plain_config).eval()
    plain.load_state_dict(normalised.state_dict())
    z, estimate, t = torch.randn(2, 3, 8, 8) * 3, torch.rand(2, 3, 8, 8), torch.tensor([10.0, 500.0])
    std = z.flatten(1).std(dim=1).view(-1, 1, 1, 1)  # of the noisy input, not of it and the estimate
    with torch.no_grad():
        expected = plain(z / std, t, self_cond=[estimate / std])
        torch.testing.assert_close(normalised(z, t, self_cond=[estimate]), expected)
