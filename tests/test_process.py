import math

import pytest
import torch
import torch.nn.functional as F

from matryoshka.diffusion.parameterisation import (
    convert_prediction,
    eps_from_v,
    loss_weight,
    prediction_target,
    v_from_x0_eps,
    x0_from_v,
)
from matryoshka.diffusion.process import MatryoshkaDiffusion
from matryoshka.diffusion.schedules import squaredcos

SCHED = squaredcos()


def make(levels=1, **kw):
    return MatryoshkaDiffusion(SCHED, num_levels=levels, **kw)


class Recorder(torch.nn.Module):
    """Fake network: pred = scale * z per level; records its inputs."""

    def __init__(self, scale: float = 0.0):
        super().__init__()
        self.scale = scale
        self.calls = []

    def forward(self, z_list, t_model, cond):
        self.calls.append(([z.clone() for z in z_list], t_model.clone(), cond))
        return [self.scale * z for z in z_list]


def test_level_ratios_and_schedules():
    p = make(3, factor=4, shift_power=2.0)
    assert [p.level_ratio(i) for i in range(3)] == [16, 4, 1]
    assert p.schedule_for_level(2) is SCHED
    t = torch.arange(1, 1001)
    for i, r in enumerate([16, 4, 1]):
        torch.testing.assert_close(p.schedule_for_level(i).log_snr(t), SCHED.log_snr(t) - 2.0 * math.log(r))


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_pyramid_shapes_and_values(levels):
    p = make(levels, factor=2)
    x = torch.randn(2, 3, 16, 8)
    pyr = p.pyramid(x)
    assert [tuple(v.shape) for v in pyr] == [(2, 3, 16 // 2**i, 8 // 2**i) for i in range(levels)]
    for i, v in enumerate(pyr):
        k = 2**i
        # Block means of the top level, computed by reshaping.
        manual = x.reshape(2, 3, 16 // k, k, 8 // k, k).mean(dim=(3, 5))
        torch.testing.assert_close(v, manual)


def test_pyramid_of_constant_is_constant():
    x = torch.full((2, 3, 16, 16), 0.3)
    for v in make(3, factor=2).pyramid(x):
        torch.testing.assert_close(v, torch.full_like(v, 0.3))


def test_pyramid_rejects_indivisible_size():
    with pytest.raises(ValueError):
        make(2, factor=4).pyramid(torch.zeros(1, 3, 6, 6))


def test_forward_statistics():
    # z^r = alpha^r x^r + sigma^r eps^r with independent noise per level.
    p = make(2, factor=4)
    gen = torch.Generator().manual_seed(0)
    n = 20000
    x = torch.full((n, 1, 8, 8), 0.5)
    t = torch.full((n,), 400)
    pyr = p.pyramid(x)
    noise = [torch.randn(v.shape, generator=gen) for v in pyr]
    z = p.add_noise(pyr, t, noise)
    for level, zi in enumerate(z):
        sch = p.schedule_for_level(level)
        a, s = sch.alpha(400).item(), sch.sigma(400).item()
        m = zi.numel()
        assert zi.mean().item() == pytest.approx(0.5 * a, abs=5 * s / math.sqrt(m))
        assert zi.std().item() == pytest.approx(s, rel=5 * math.sqrt(2 / m))
    # Top and bottom noise independent (correlation ~ 0).
    top_pooled = F.avg_pool2d(noise[0], 4).flatten()
    corr = torch.corrcoef(torch.stack([top_pooled, noise[1].flatten()]))[0, 1]
    assert abs(corr.item()) < 5 / math.sqrt(top_pooled.numel())


def test_conversions_round_trip():
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    alpha = torch.tensor(0.6, dtype=torch.float64)
    sigma = torch.tensor(0.8, dtype=torch.float64)
    z = alpha * x0 + sigma * eps
    v = v_from_x0_eps(x0, eps, alpha, sigma)
    torch.testing.assert_close(x0_from_v(z, v, alpha, sigma), x0)
    torch.testing.assert_close(eps_from_v(z, v, alpha, sigma), eps)
    values = {"x0": x0, "eps": eps, "v": v}
    for src in values:
        torch.testing.assert_close(prediction_target(src, x0, eps, alpha, sigma), values[src])
        for dst in values:
            out = convert_prediction(values[src], src, dst, z, alpha, sigma)
            torch.testing.assert_close(out, values[dst])
    with pytest.raises(ValueError, match="eps, x0, v"):
        convert_prediction(v, "score", "x0", z, alpha, sigma)


def test_single_level_loss_matches_hand_computation():
    # One level = ordinary pixel diffusion. Zero v-prediction => eps_hat = sigma * z.
    p = make(1)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(4, 3, 4, 4, generator=gen) * 2 - 1
    eps = torch.randn(x.shape, generator=gen)
    t = torch.tensor([1, 10, 500, 1000])
    model = Recorder(0.0)
    loss, logs = p.loss(model, x, t=t, noise=[eps])
    a = SCHED.alpha(t).float().view(-1, 1, 1, 1)
    s = SCHED.sigma(t).float().view(-1, 1, 1, 1)
    z = a * x + s * eps
    expected = ((s * z - eps) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logs["loss/4x4"], expected)
    # The network sees t - 1.
    torch.testing.assert_close(model.calls[0][1], (t - 1).float())
    torch.testing.assert_close(model.calls[0][0][0], z)


@pytest.mark.parametrize("prediction,target", [("eps", "eps"), ("x0", "x0"), ("v", "v"), ("x0", "eps")])
def test_loss_targets(prediction, target):
    p = make(1, prediction=prediction, loss_target=target)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 4, 4, generator=gen)
    eps = torch.randn(x.shape, generator=gen)
    t = torch.tensor([5, 300, 900])
    loss, _ = p.loss(Recorder(0.5), x, t=t, noise=[eps])
    a = SCHED.alpha(t).float().view(-1, 1, 1, 1)
    s = SCHED.sigma(t).float().view(-1, 1, 1, 1)
    z = a * x + s * eps
    raw = 0.5 * z
    x0_hat = {"eps": (z - s * raw) / a, "x0": raw, "v": a * z - s * raw}[prediction]
    eps_hat = (z - a * x0_hat) / s
    pred = {"eps": eps_hat, "x0": x0_hat, "v": a * eps_hat - s * x0_hat}[target]
    true = {"eps": eps, "x0": x, "v": a * eps - s * x}[target]
    torch.testing.assert_close(loss, ((pred - true) ** 2).mean(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("floor", [0.0, 1.0])
@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_min_snr_loss_is_the_same_x0_loss_in_every_target(target, floor):
    # Min-SNR-gamma is clamp(SNR, floor, gamma) * |x0_hat - x0|^2 whatever the regression target.
    p = make(1, prediction="v", loss_target=target, loss_weighting="min_snr", min_snr_gamma=5.0, min_snr_floor=floor)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 4, 4, generator=gen)
    eps = torch.randn(x.shape, generator=gen)
    t = torch.tensor([3, 200, 600, 990])
    loss, _ = p.loss(Recorder(0.3), x, t=t, noise=[eps])
    a = SCHED.alpha(t).float().view(-1, 1, 1, 1)
    s = SCHED.sigma(t).float().view(-1, 1, 1, 1)
    z = a * x + s * eps
    x0_hat = a * z - s * (0.3 * z)
    snr = (a / s).pow(2).flatten()
    per_sample = (x0_hat - x).pow(2).flatten(1).mean(1)
    expected = (snr.clamp(min=floor, max=5.0) * per_sample).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    assert float(snr[0]) > 5 > 1 > float(snr[-1])  # every side of the clamp is exercised


def test_min_snr_uses_each_levels_shifted_snr():
    p = make(2, loss_weighting="min_snr", min_snr_gamma=1.0)
    t = torch.tensor([300])
    for level in range(2):
        snr = p.schedule_for_level(level).log_snr(t).exp().float()
        expected = snr.clamp(max=1.0) / snr
        torch.testing.assert_close(loss_weight("eps", snr.log(), "min_snr", 1.0), expected)
    with pytest.raises(ValueError, match="min_snr"):
        make(1, loss_weighting="p2")
    with pytest.raises(ValueError, match="min_snr_floor"):
        make(1, loss_weighting="min_snr", min_snr_gamma=1.0, min_snr_floor=2.0)


def test_mixed_ratio_loss_matches_hand_computation():
    p = make(2, factor=2, mixed_ratio=0.5, level_weights=[2.0, 1.0])
    gen = torch.Generator().manual_seed(4)
    B = 6
    x = torch.randn(B, 3, 8, 8, generator=gen)
    pyr = p.pyramid(x)
    noise = [torch.randn(v.shape, generator=gen) for v in pyr]
    t = torch.tensor([3, 100, 250, 600, 800, 1000])
    model = Recorder(0.25)
    loss, logs = p.loss(model, x, t=t, noise=noise)

    z_in = model.calls[0][0]
    assert z_in[0].shape[0] == 3 and z_in[1].shape[0] == B

    def level_losses(level, n):
        sch = p.schedule_for_level(level)
        a = sch.alpha(t[:n]).float().view(-1, 1, 1, 1)
        s = sch.sigma(t[:n]).float().view(-1, 1, 1, 1)
        z = a * pyr[level][:n] + s * noise[level][:n]
        eps_hat = s * z + a * (0.25 * z)  # v-prediction -> eps
        return ((eps_hat - noise[level][:n]) ** 2).mean(dim=(1, 2, 3))

    top, low = level_losses(0, 3), level_losses(1, B)
    torch.testing.assert_close(loss, 2.0 * top.mean() + low.mean())
    # Equal to ml-mdm's sum over kept samples / (m * B) since m * B is an integer here.
    padded = torch.cat([top, torch.zeros(3)])
    torch.testing.assert_close(loss, 2.0 * (padded / 0.5).mean() + low.mean())
    assert list(logs) == ["loss/8x8", "loss/4x4"]
    torch.testing.assert_close(logs["loss/8x8"], top.mean())
    torch.testing.assert_close(logs["loss/4x4"], low.mean())


def test_top_level_only_loss_keeps_graph():
    p = make(2, factor=2, loss_on_all_levels=False, level_weights=[3.0, 5.0])
    weight = torch.nn.Parameter(torch.tensor(0.1))

    def model(z_list, t_model, cond):
        return [weight * z for z in z_list]

    x = torch.randn(4, 1, 4, 4)
    noise = [torch.randn(4, 1, 4, 4), torch.randn(4, 1, 2, 2)]
    t = torch.full((4,), 200)
    loss, logs = p.loss(model, x, t=t, noise=noise)
    torch.testing.assert_close(loss, 3.0 * logs["loss/4x4"])
    loss.backward()
    assert weight.grad is not None


def test_top_batch_rounding():
    assert make(1, mixed_ratio=0.29).top_batch(100) == 29
    assert make(1, mixed_ratio=2 / 3).top_batch(6) == 4
    assert make(1, mixed_ratio=0.1).top_batch(3) == 1
    assert make(1).top_batch(7) == 7


def test_sampled_timesteps_and_generator_determinism():
    p = make(2, factor=2)
    x = torch.randn(64, 1, 4, 4)
    t = p.sample_timesteps(10000, torch.Generator().manual_seed(0))
    assert t.min().item() == 1 and t.max().item() == 1000
    runs = []
    for _ in range(2):
        model = Recorder(0.3)
        loss, _ = p.loss(model, x, generator=torch.Generator().manual_seed(5))
        runs.append((loss, model.calls[0][1]))
    torch.testing.assert_close(runs[0][0], runs[1][0])
    torch.testing.assert_close(runs[0][1], runs[1][1])
    assert runs[0][1].min() >= 0 and runs[0][1].max() <= 999


def test_logit_normal_timesteps_match_their_distribution():
    mean, std = 0.5, 0.8
    t = make(1, time_logit_normal=(mean, std)).sample_timesteps(200_000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min().item() >= 1 and t.max().item() <= 1000
    # P(t <= k) = P(sigmoid(N) <= k/T) = Phi((logit(k/T) - mean) / std), exactly, for the rounded-up draw.
    for k in (100, 500, 622, 900):
        expected = 0.5 * (1 + math.erf((math.log(k / (1000 - k)) - mean) / (std * math.sqrt(2))))
        assert abs((t <= k).double().mean().item() - expected) < 0.004
    with pytest.raises(ValueError, match="time_logit_normal"):
        make(1, time_logit_normal=(0.0, 0.0))


def test_initial_noise_shapes():
    p = make(3, factor=2)
    noise = p.initial_noise(2, 3, 16, 8, generator=torch.Generator().manual_seed(0))
    assert [tuple(n.shape) for n in noise] == [(2, 3, 16, 8), (2, 3, 8, 4), (2, 3, 4, 2)]


def test_bad_arguments():
    with pytest.raises(ValueError, match="eps, x0, v"):
        make(1, prediction="epsilon")
    with pytest.raises(ValueError, match="eps, x0, v"):
        make(1, loss_target="score")
    with pytest.raises(ValueError):
        make(2, mixed_ratio=0.0)
    with pytest.raises(ValueError):
        make(2, level_weights=[1.0])
    p = make(2, factor=2)
    with pytest.raises(ValueError):
        p.loss(Recorder(), torch.zeros(2, 1, 4, 4), t=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one prediction per level"):
        p.loss(lambda z, t, c: z[:1], torch.zeros(2, 1, 4, 4))


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_upsampled_residual_makes_a_zero_output_copy_the_level_below(prediction, mode):
    # x0 of the top level = upsampled clipped x0 of the level below + (x0(r) - x0(0)).
    p = make(2, prediction=prediction, upsampled_residual=True, residual_upsampling=mode)
    gen = torch.Generator().manual_seed(5)
    z = [torch.randn(3, 3, 8, 8, generator=gen), torch.randn(3, 3, 2, 2, generator=gen)]
    t = torch.tensor([10, 400, 900])
    zero = p.network_output(Recorder(0.0), z, t, None)
    a, s = p.coefficients(1, t, z[1])
    low_x0 = convert_prediction(torch.zeros_like(z[1]), prediction, "x0", z[1], a, s)
    a, s = p.coefficients(0, t, z[0])
    top_x0 = convert_prediction(zero[0], prediction, "x0", z[0], a, s)
    expected = F.interpolate(low_x0.clamp(-1, 1), scale_factor=4, mode=mode).clamp(-1, 1)
    torch.testing.assert_close(top_x0, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(zero[1], torch.zeros_like(z[1]))  # the innermost level is untouched
    # A non-zero output r: x0 = upsampled x0 of the level below (from its own r) + x0(r) - x0(0).
    out = p.network_output(Recorder(0.5), z, t, None)
    a1, s1 = p.coefficients(1, t, z[1])
    low = convert_prediction(0.5 * z[1], prediction, "x0", z[1], a1, s1)
    base = F.interpolate(low.clamp(-1, 1), scale_factor=4, mode=mode).clamp(-1, 1)
    delta = convert_prediction(0.5 * z[0], prediction, "x0", z[0], a, s) - convert_prediction(
        0 * z[0], prediction, "x0", z[0], a, s
    )
    torch.testing.assert_close(
        convert_prediction(out[0], prediction, "x0", z[0], a, s), base + delta, rtol=1e-3, atol=2e-4
    )
    with pytest.raises(ValueError, match="residual_upsampling"):
        make(2, upsampled_residual=True, residual_upsampling="nearest")
