"""EDM2's magnitude-preserving layers (``model.magnitude_preserving``) against their closed forms."""

import copy
import math
from dataclasses import replace

import pytest
import torch

from matryoshka.models import Conditioning, NestedUNet
from matryoshka.models.mp_layers import MPConv, MPFourier, MPResNet, mp_cat, mp_silu, mp_sum, normalize
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


def reference_conv(conv: MPConv, x: torch.Tensor) -> torch.Tensor:
    """EDM2's convolution written out: normalised weights over sqrt(fan-in), times the gain, by autograd."""
    w = normalize(conv.weight) / math.sqrt(conv.weight[0].numel())
    w = w * (1.0 if conv.gain is None else conv.gain)
    return x @ w.t() if w.dim() == 2 else torch.nn.functional.conv2d(x, w, padding=w.shape[-1] // 2)


@pytest.mark.parametrize("kernel", [0, 1, 3])
def test_conv_gradient_is_autograd_through_the_normalisation(kernel):
    torch.manual_seed(0)
    conv = MPConv(6, 5, kernel, zero_gain=True).double()
    with torch.no_grad():
        conv.weight.mul_(torch.rand(5, *[1] * (conv.weight.dim() - 1), dtype=torch.double) * 3)
        conv.weight[2].zero_()  # a dead row: no direction to remove, and no 0/0
        conv.gain.fill_(0.7)
    x = torch.randn(4, 6, dtype=torch.double) if kernel == 0 else torch.randn(4, 6, 5, 5, dtype=torch.double)
    reference = copy.deepcopy(conv)
    with torch.no_grad():
        reference.weight.copy_(normalize(reference.weight))  # the forced normalisation the layer does first
    expected = reference_conv(reference, x) * 1.5
    expected.square().sum().backward()
    got = conv.train()(x, scale=1.5)
    got.square().sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv.weight, reference.weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv.weight.grad, reference.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(conv.gain.grad, reference.gain.grad, rtol=1e-10, atol=1e-12)
    assert conv.weight.grad[2].abs().max() == 0


@pytest.mark.parametrize("encoder", [True, False])
def test_resnet_block_is_edm2s_block(encoder):
    """The constants folded into the convolutions leave EDM2's block: conv, scale by the embedding, conv,
    then mp_sum(input, branch, 0.3)."""
    torch.manual_seed(0)
    block = MPResNet(8, 12, 16, encoder=encoder, dropout=0.0).double().eval()
    with torch.no_grad():
        block.emb_linear.gain.fill_(0.5)
    x, emb = torch.randn(3, 8, 6, 6, dtype=torch.double), torch.randn(3, 16, dtype=torch.double)
    skip = x
    if encoder:
        skip = normalize(reference_conv(block.conv_skip, x), dim=1)
    y = reference_conv(block.conv_res0, mp_silu(skip))
    y = mp_silu(y * (reference_conv(block.emb_linear, emb) + 1)[:, :, None, None])
    y = reference_conv(block.conv_res1, y)
    if not encoder:
        skip = reference_conv(block.conv_skip, x)
    torch.testing.assert_close(block(x, emb), mp_sum(skip, y, 0.3), rtol=1e-12, atol=1e-12)


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
