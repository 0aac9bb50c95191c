"""EDM2's magnitude-preserving layers (``model.magnitude_preserving``) against their closed forms."""

import copy
import math
from dataclasses import replace

import pytest
import torch

from matryoshka.models import Conditioning, NestedUNet
from matryoshka.models.mp_layers import MPConv, MPFourier, mp_cat, mp_silu, mp_sum
from matryoshka.models.presets import tiny
from matryoshka.pipeline import load_pipeline
from matryoshka.training.trainer import Trainer

from .test_cli import make_image_folder
from .test_progressive import progressive_config


def test_sum_cat_and_silu_keep_unit_variance():
    torch.manual_seed(0)
    a, b = torch.randn(2, 200_000)
    assert mp_sum(a, b, 0.3).var().item() == pytest.approx(1.0, abs=0.01)
    assert mp_silu(a).square().mean().item() == pytest.approx(1.0, abs=0.02)
    wide, narrow = torch.randn(4000, 48, 1, 1), torch.randn(4000, 16, 1, 1)
    joined = mp_cat(wide, narrow, t=0.3)
    # Energy shares (1 - t)^2 : t^2 of the total, which stays at one per channel.
    energy = joined.square().sum(1).mean().item()
    assert energy == pytest.approx(64.0, rel=0.02)
    share = joined[:, 48:].square().sum(1).mean().item() / energy
    assert share == pytest.approx(0.3**2 / (0.7**2 + 0.3**2), rel=0.02)


def test_fourier_features_have_unit_variance():
    features = MPFourier(256)(torch.linspace(0, 1, 4000))
    assert features.square().mean().item() == pytest.approx(1.0, abs=0.05)


def test_conv_keeps_unit_variance_and_forces_unit_norm_weights():
    torch.manual_seed(0)
    conv = MPConv(32, 64, 3)
    with torch.no_grad():
        conv.weight.mul_(7.0)
    conv.eval()
    out = conv(torch.randn(16, 32, 24, 24))
    assert out[:, :, 1:-1, 1:-1].var().item() == pytest.approx(1.0, abs=0.05)
    assert conv.weight.flatten(1).norm(dim=1).mean().item() == pytest.approx(7 * math.sqrt(32 * 9), rel=0.1)
    conv.train()
    conv(torch.randn(1, 32, 4, 4))
    # Forced weight normalisation: the stored weights are rewritten to unit root-mean-square.
    rms = conv.weight.flatten(1).square().mean(1).sqrt()
    torch.testing.assert_close(rms, torch.ones(64), atol=1e-3, rtol=0)


def test_a_fresh_model_predicts_zero_and_every_parameter_learns():
    config = replace(tiny(2), magnitude_preserving=True, num_classes=3)
    model = NestedUNet(config)
    z = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    t = torch.tensor([3.0, 700.0])
    cond = Conditioning(labels=torch.tensor([1, -1]))
    assert all(out.abs().max() == 0 for out in model(z, t, cond))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gain"):
                parameter.fill_(1.0)
    loss = sum(out.square().mean() for out in model(z, t, cond))
    loss.backward()
    silent = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert silent == []


def test_fresh_nesting_reproduces_the_inner_model():
    config = replace(tiny(2), magnitude_preserving=True)
    inner = NestedUNet(config.truncated(1))
    with torch.no_grad():
        for parameter in inner.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1 + 0.5 * (parameter.dim() == 0))
    nested = NestedUNet(config)
    nested.inner_unet.load_state_dict(inner.state_dict())
    inner.eval()
    nested.eval()
    z = [torch.randn(3, 3, 16, 16), torch.randn(3, 3, 8, 8)]
    t = torch.tensor([1.0, 500.0, 999.0])
    with torch.no_grad():
        expected = inner(z[1:], t)[0]
        got = nested(z, t)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got[1], expected, rtol=0, atol=0)
    assert got[0].abs().max() == 0


def test_unsupported_options_are_rejected():
    with pytest.raises(ValueError, match="magnitude_preserving"):
        replace(tiny(2), magnitude_preserving=True, text_dim=8)
    config = tiny(2)
    config.levels[0].attention_ffn = True
    with pytest.raises(ValueError, match="feed-forward"):
        replace(config, magnitude_preserving=True)


def test_a_progressive_run_grows_resumes_and_samples(tmp_path):
    folder = make_image_folder(tmp_path / "images")
    config = progressive_config(tmp_path / "run", folder)
    config = replace(
        config, model=replace(config.model, magnitude_preserving=True), train=replace(config.train, lr=4e-2)
    )
    trainer = Trainer(config, quiet=True)
    for _ in range(3):
        trainer._ensure_stage()
        trainer._train_step()
        trainer.step += 1
    inner = copy.deepcopy(trainer.model).eval()
    trainer._ensure_stage()
    assert trainer.num_levels == 2
    z = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    t = torch.tensor([50.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(trainer.model.eval()(z, t)[1], inner([z[1]], t)[0], rtol=0, atol=0)
    loss, _, grad_norm, _ = trainer._train_step()
    assert math.isfinite(loss) and grad_norm > 0

    Trainer(config, quiet=True).train()  # resumes nothing (no checkpoint yet): trains all 6 steps and saves
    pipe = load_pipeline(config.run_dir, device="cpu")
    assert pipe.model.config.magnitude_preserving
    images = pipe.generate(num=2, sampler="ddim", steps=3, seed=0)
    assert [tuple(x.shape) for x in images] == [(2, 3, 16, 16), (2, 3, 8, 8)]
    assert all(bool(torch.isfinite(x).all()) for x in images)
