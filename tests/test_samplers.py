"""Samplers checked against the analytic optimal denoiser of Gaussian data.

For x ~ N(mu, diag(var)) and z = alpha x + sigma eps, E[x | z] is linear in z, so every
sampler is a linear-Gaussian map of its initial noise and its output moments after a
finite number of steps can be computed exactly with a scalar recursion (below).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from matryoshka.diffusion.parameterisation import convert_prediction
from matryoshka.diffusion.process import MatryoshkaDiffusion
from matryoshka.diffusion.samplers import (
    SAMPLERS,
    get_sampler,
    level_etas,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sampling_timesteps,
)
from matryoshka.diffusion.schedules import squaredcos
from matryoshka.diffusion.thresholding import dynamic_threshold, threshold_x0

N = 4000  # samples per Monte-Carlo run
CONFIGS = [("ddpm", 50, {}), ("ddim", 50, {"eta": 0.0}), ("ddim", 50, {"eta": 1.0}), ("dpm++2m", 25, {})]


class GaussianDenoiser(torch.nn.Module):
    """Closed-form E[x0 | z_t] per level for independent Gaussian pixels.

    Each level is denoised from its own z only (optimal for that level's marginal),
    and the output is returned in the process's prediction type.
    """

    def __init__(self, process, means, variances):
        super().__init__()
        self.process, self.means, self.variances = process, means, variances
        self.calls = []

    def forward(self, z_list, t_model, cond=None):
        self.calls.append((z_list[0].shape[0], t_model.clone()))
        t = (t_model + 1).round().long()
        out = []
        for level, z in enumerate(z_list):
            a, s = self.process.coefficients(level, t, z)
            mu, var = self.means[level], self.variances[level]
            x0 = mu + a * var / (a * a * var + s * s) * (z - a * mu)
            out.append(convert_prediction(x0, "x0", self.process.prediction, z, a, s))
        return out


def gaussian_setup(levels, prediction="v"):
    """Data x ~ N(mu, diag(std^2)); lower levels are avg-pools (factor 2) of the top."""
    gen = torch.Generator().manual_seed(123)
    side = 4
    mu = torch.rand(3, side, side, generator=gen) - 0.5
    std = 0.8 + 0.8 * torch.rand(3, side, side, generator=gen)
    process = MatryoshkaDiffusion(squaredcos(), num_levels=levels, factor=2, prediction=prediction)
    means, variances = [mu], [std**2]
    for _ in range(levels - 1):
        # Mean of k^2 independent pixels: mean of means, variance sum(var) / k^4.
        means.append(F.avg_pool2d(means[-1][None], 2)[0])
        variances.append(F.avg_pool2d(variances[-1][None], 2)[0] / 4)
    return process, GaussianDenoiser(process, means, variances), means, variances, side


def run(name, process, model, side, steps, opts, noise_seed=0, gen_seed=1, n=N, **kw):
    noise = process.initial_noise(n, 3, side, generator=torch.Generator().manual_seed(noise_seed))
    gen = torch.Generator().manual_seed(gen_seed)
    return get_sampler(name)(model, noise, process, steps, generator=gen, clip_x0=False, **opts, **kw), noise


def recursion(schedule, mu, var, name, steps, eta=0.0, spacing="mlmdm"):
    """Exact output of a sampler on one Gaussian pixel: z_out = P z_init + Q + noise of
    variance Nv. Returns (P, Q, Nv). An independent scalar restatement of the updates."""
    ts = sampling_timesteps(schedule.num_steps, steps, spacing)
    P, Q, Nv = torch.ones_like(mu), torch.zeros_like(mu), torch.zeros_like(mu)
    prev = None
    eta = 1.0 if name == "ddpm" else eta
    for t, s in zip(ts[:-1], ts[1:]):
        gt, gs = schedule.gammas[t].item(), schedule.gammas[s].item()
        at, st = math.sqrt(gt), math.sqrt(1 - gt)
        k = at * var / (gt * var + 1 - gt)  # x0 = k z + (1 - k at) mu
        xP, xQ, _xN = k * P, k * Q + (1 - k * at) * mu, k * k * Nv
        if name == "dpm++2m":
            if s == 0:
                P, Q = xP, xQ
                continue
            h = 0.5 * math.log(gs / (1 - gs)) - 0.5 * math.log(gt / (1 - gt))
            dP, dQ = xP, xQ
            if prev is not None:
                c = h / (2 * prev[2])
                dP, dQ = (1 + c) * xP - c * prev[0], (1 + c) * xQ - c * prev[1]
            prev = (xP, xQ, h)
            r, cx = math.sqrt((1 - gs) / (1 - gt)), math.sqrt(gs) * (1 - math.exp(-h))
            P, Q = r * P + cx * dP, r * Q + cx * dQ
        else:
            v = min(eta**2 * (gs - gt) / gs * (1 - gs) / (1 - gt), 1 - gs)  # at most a full renoising
            ce = math.sqrt(1 - gs - v) / st  # coefficient of (z - at x0)
            cx = math.sqrt(gs) - ce * at
            P, Q, Nv = cx * xP + ce * P, cx * xQ + ce * Q, (cx * k + ce) ** 2 * Nv + v
    return P, Q, Nv


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("name,steps,opts", CONFIGS)
def test_reproduces_data_moments(levels, name, steps, opts):
    process, model, means, variances, side = gaussian_setup(levels)
    out, _ = run(name, process, model, side, steps, opts)
    assert len(out) == levels
    # Bounds allow Monte-Carlo error plus the known few-step bias of each sampler on this
    # schedule (e.g. 50 ancestral steps lose ~12% variance; see the recursion test).
    var_band = {"ddpm": (0.82, 1.05), "ddim": (0.82, 1.05) if opts.get("eta") else (0.88, 1.05)}
    lo, hi = var_band.get(name, (0.93, 1.07))
    for level in range(levels):
        mean, var = out[level].mean(0), out[level].var(0)
        mean_err = (mean - means[level]).abs()
        assert bool((mean_err < 5 * (variances[level] / N).sqrt() + 0.05).all()), mean_err.max()
        ratio = (var / variances[level]).mean().item()
        assert lo < ratio < hi, (level, ratio)


@pytest.mark.parametrize("spacing", ["mlmdm", "trailing"])
# eta 3 in 10 steps: the variance cap (a full renoising at most) binds in most steps.
# [3, 0]: the 8² level stochastic and the 4² one deterministic in the same run, each eta its own level's.
@pytest.mark.parametrize("name,steps,opts", [*CONFIGS, ("ddim", 10, {"eta": 3.0}), ("ddim", 10, {"eta": [3.0, 0.0]})])
def test_matches_exact_finite_step_recursion(name, steps, opts, spacing):
    process, model, means, variances, side = gaussian_setup(2)
    out, noise = run(name, process, model, side, steps, opts, spacing=spacing)
    for level in range(2):
        eta = opts.get("eta", 0.0)
        eta = eta[level] if isinstance(eta, list) else eta
        P, Q, Nv = recursion(
            process.schedule_for_level(level),
            means[level].double(),
            variances[level].double(),
            name,
            steps,
            eta,
            spacing,
        )
        if name == "dpm++2m" or (name == "ddim" and eta == 0.0):
            # Deterministic: the output is exactly P * noise + Q, sample by sample.
            torch.testing.assert_close(out[level], (P * noise[level] + Q).float(), atol=2e-4, rtol=1e-4)
        else:
            n_pix = P.numel()
            var = (P**2 + Nv).float()
            z_mean = ((out[level].mean(0) - Q.float()) / (var / N).sqrt()).pow(2).mean().sqrt()
            assert z_mean < 1 + 5 / math.sqrt(n_pix)  # RMS of standardized mean errors ~ 1
            ratio = (out[level].var(0) / var).mean().item()
            assert abs(ratio - 1) < 5 * math.sqrt(2 / N) / math.sqrt(n_pix) + 0.005


def test_level_etas():
    assert level_etas(1.5, 2) == [1.5, 1.5]
    assert level_etas([2.0, 0.5], 2) == [2.0, 0.5]
    assert level_etas([2.0, 0.5], 1) == [0.5]  # an earlier stage's model has only the inner level
    with pytest.raises(ValueError, match="one eta per level"):
        level_etas([2.0], 2)
    with pytest.raises(ValueError, match=">= 0"):
        level_etas([2.0, -1.0], 2)


def test_ddpm_equals_ddim_eta_one():
    process, model, _, _, side = gaussian_setup(2)
    a, _ = run("ddpm", process, model, side, 20, {}, n=64)
    b, _ = run("ddim", process, model, side, 20, {"eta": 1.0}, n=64)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_prediction_types_agree(prediction):
    ref_process, ref_model, _, _, side = gaussian_setup(2, "v")
    process, model, _, _, _ = gaussian_setup(2, prediction)
    ref, _ = run("ddim", ref_process, ref_model, side, 10, {}, n=32)
    out, _ = run("ddim", process, model, side, 10, {}, n=32)
    for x, y in zip(ref, out):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_determinism():
    process, model, _, _, side = gaussian_setup(2)
    a, _ = run("ddim", process, model, side, 10, {}, gen_seed=1, n=16)
    b, _ = run("ddim", process, model, side, 10, {}, gen_seed=2, n=16)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # eta = 0 ignores the generator
    c, _ = run("ddpm", process, model, side, 10, {}, gen_seed=1, n=16)
    d, _ = run("ddpm", process, model, side, 10, {}, gen_seed=1, n=16)
    e, _ = run("ddpm", process, model, side, 10, {}, gen_seed=2, n=16)
    assert all(torch.equal(x, y) for x, y in zip(c, d))
    assert not torch.allclose(c[0], e[0])


def test_timestep_spacing():
    assert sampling_timesteps(1000, 1000) == list(range(1000, -1, -1))
    ts = sampling_timesteps(1000, 50)
    assert len(ts) == 51 and ts[0] == 981 and ts[1] == 962 and ts[-1] == 0
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert sampling_timesteps(1000, 1) == [500, 0]  # round(500.5) = 500, half to even
    assert sampling_timesteps(1000, 25)[0] == 962 and sampling_timesteps(1000, 5)[0] == 834
    # Trailing spacing starts from pure noise whatever the step count.
    assert sampling_timesteps(1000, 5, "trailing") == [1000, 800, 600, 400, 200, 0]
    assert sampling_timesteps(1000, 3, "trailing") == [1000, 667, 333, 0]
    assert sampling_timesteps(1000, 1000, "trailing") == list(range(1000, -1, -1))
    with pytest.raises(ValueError, match="trailing"):
        sampling_timesteps(1000, 5, "leading")
    for bad in (0, 1001):
        with pytest.raises(ValueError):
            sampling_timesteps(1000, bad)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_one_call_per_step_and_model_time(name):
    process, model, _, _, side = gaussian_setup(2)
    seen = []
    run(name, process, model, side, 8, {}, n=4, callback=lambda i, n, t, x0, z: seen.append((i, n, t)))
    ts = sampling_timesteps(1000, 8)
    assert len(model.calls) == 8
    assert [c[0] for c in model.calls] == [4] * 8
    assert [c[1][0].item() for c in model.calls] == [t - 1 for t in ts[:-1]]
    assert seen == [(i, 8, ts[i]) for i in range(8)]


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_last_step_returns_x0(name):
    process, model, _, _, side = gaussian_setup(2)
    last = {}

    def callback(i, n, t, x0, z):
        last.update(x0=x0)

    out, _ = run(name, process, model, side, 5, {}, n=8, callback=callback)
    for x, y in zip(out, last["x0"]):
        torch.testing.assert_close(x, y)


def test_dpm_first_step_is_ddim():
    process, model, _, _, side = gaussian_setup(2)
    first = {}

    def grab(key):
        return lambda i, n, t, x0, z: first.setdefault(key, z) if i == 0 else None

    run("dpm++2m", process, model, side, 10, {}, n=8, callback=grab("dpm"))
    run("ddim", process, model, side, 10, {}, n=8, callback=grab("ddim"))
    for x, y in zip(first["dpm"], first["ddim"]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


# ----- guidance ---------------------------------------------------------------


class Labels:
    """Fake conditioning implementing the cat/unconditional protocol."""

    def __init__(self, values):
        self.values = values

    def cat(self, other):
        return Labels(torch.cat([self.values, other.values]))

    def unconditional(self):
        return Labels(torch.zeros_like(self.values))


class LabelModel(torch.nn.Module):
    """x0-predicting model whose output depends on the conditioning: x0 = 0.1 z + 0.05 c."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, z_list, t_model, cond):
        self.batches.append(z_list[0].shape[0])
        c = cond.values.view(-1, 1, 1, 1)
        return [0.1 * z + 0.05 * c * (level + 1) for level, z in enumerate(z_list)]


def guided_first_step(guidance, uncond=None, steps=4, **kw):
    process = MatryoshkaDiffusion(squaredcos(), num_levels=2, factor=2, prediction="x0")
    noise = process.initial_noise(3, 1, 4, generator=torch.Generator().manual_seed(0))
    cond = Labels(torch.tensor([1.0, 2.0, 3.0]))
    model = LabelModel()
    steps_seen = []
    out = sample_ddim(
        model,
        noise,
        process,
        steps,
        cond=cond,
        uncond=uncond,
        guidance=guidance,
        callback=lambda i, n, t, x0, z: steps_seen.append(x0),
        clip_x0=False,
        **kw,
    )
    return noise, cond, model, steps_seen, out


@pytest.mark.parametrize("guidance", [3.0, [2.0, 5.0]])
def test_guidance_combines_cond_and_uncond(guidance):
    noise, cond, model, x0s, _ = guided_first_step(guidance)
    scales = guidance if isinstance(guidance, list) else [guidance, guidance]
    assert model.batches == [6, 6, 6, 6]  # one doubled call per step
    for level, g in enumerate(scales):
        c = cond.values.view(-1, 1, 1, 1)
        pred_cond = 0.1 * noise[level] + 0.05 * c * (level + 1)
        pred_uncond = 0.1 * noise[level]  # unconditional() gives zeros
        torch.testing.assert_close(x0s[0][level], pred_uncond + g * (pred_cond - pred_uncond))


def test_explicit_uncond_is_used():
    noise, cond, _, x0s, _ = guided_first_step(2.0, uncond=Labels(torch.full((3,), -1.0)))
    pred_cond = 0.1 * noise[0] + 0.05 * cond.values.view(-1, 1, 1, 1)
    pred_uncond = 0.1 * noise[0] - 0.05
    torch.testing.assert_close(x0s[0][0], pred_uncond + 2.0 * (pred_cond - pred_uncond))


def test_guidance_one_is_cond_only():
    noise, cond, model, x0s, out = guided_first_step(1.0)
    assert model.batches == [3, 3, 3, 3]
    torch.testing.assert_close(x0s[0][0], 0.1 * noise[0] + 0.05 * cond.values.view(-1, 1, 1, 1))
    _, _, _, _, out_unit = guided_first_step([1.0, 1.0])
    for x, y in zip(out, out_unit):
        torch.testing.assert_close(x, y)


def test_guidance_interval():
    # Steps at t = 800, 600, 400, 200 (4 steps, T = 1000); guide only for t/T in [0.3, 0.7].
    assert sampling_timesteps(1000, 4)[:-1] == [801, 601, 400, 200]
    _, _, model, _, _ = guided_first_step(3.0, guidance_interval=(0.3, 0.7))
    assert model.batches == [3, 6, 6, 3]


def test_guidance_needs_conditioning():
    process = MatryoshkaDiffusion(squaredcos(), num_levels=1, prediction="x0")
    noise = process.initial_noise(2, 1, 4)
    with pytest.raises(ValueError, match="conditioning"):
        sample_ddpm(LabelModel(), noise, process, 2, guidance=2.0)
    with pytest.raises(TypeError, match="uncond"):
        sample_ddpm(LabelModel(), noise, process, 2, cond=torch.ones(2), guidance=2.0)
    with pytest.raises(ValueError, match="one guidance scale per level"):
        sample_ddpm(LabelModel(), noise, process, 2, cond=Labels(torch.ones(2)), guidance=[2.0, 3.0])


def test_tensor_conditioning_with_explicit_uncond():
    class TensorModel(torch.nn.Module):
        def forward(self, z_list, t_model, cond):
            return [0.1 * z_list[0] + cond.view(-1, 1, 1, 1)]

    process = MatryoshkaDiffusion(squaredcos(), num_levels=1, prediction="x0")
    noise = process.initial_noise(2, 1, 4, generator=torch.Generator().manual_seed(0))
    x0s = []
    sample_dpmpp_2m(
        TensorModel(),
        noise,
        process,
        3,
        cond=torch.tensor([0.2, 0.4]),
        uncond=torch.zeros(2),
        guidance=2.0,
        clip_x0=False,
        callback=lambda i, n, t, x0, z: x0s.append(x0),
    )
    torch.testing.assert_close(x0s[0][0], 0.1 * noise[0] + 2.0 * torch.tensor([0.2, 0.4]).view(-1, 1, 1, 1))


# ----- x0 thresholding --------------------------------------------------------


def test_dynamic_threshold_closed_form():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 8, 8, generator=gen) * torch.tensor([0.2, 1.0, 2.0, 3.0, 5.0]).view(-1, 1, 1, 1)
    s = torch.quantile(x.flatten(1).abs(), 0.995, dim=1).clamp(min=1).view(-1, 1, 1, 1)
    expected = torch.maximum(torch.minimum(x, s), -s) / s
    torch.testing.assert_close(dynamic_threshold(x, 0.995), expected)
    torch.testing.assert_close(dynamic_threshold(x[:1]), x[:1])  # |x| small: s = 1, unchanged
    torch.testing.assert_close(threshold_x0(x, clip=True), x.clamp(-1, 1))
    assert threshold_x0(x, clip=False) is x
    with pytest.raises(ValueError):
        dynamic_threshold(x, 1.5)


def test_sampler_clips_x0():
    process, model, _, _, side = gaussian_setup(1)
    seen = []
    noise = process.initial_noise(8, 3, side, generator=torch.Generator().manual_seed(0))
    out = sample_ddpm(
        model,
        noise,
        process,
        5,
        generator=torch.Generator().manual_seed(0),
        callback=lambda i, n, t, x0, z: seen.append(x0[0]),
    )
    assert all(x.abs().max() <= 1 for x in seen) and out[0].abs().max() <= 1
    seen.clear()
    sample_ddpm(
        model,
        noise,
        process,
        5,
        generator=torch.Generator().manual_seed(0),
        dynamic_threshold=0.9,
        clip_x0=False,
        callback=lambda i, n, t, x0, z: seen.append(x0[0]),
    )
    assert all(x.abs().max() <= 1 for x in seen)


# ----- registry ---------------------------------------------------------------


def test_registry():
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpm++2m"}
    assert get_sampler("ddim") is sample_ddim
    with pytest.raises(ValueError, match="ddpm, ddim, dpm\\+\\+2m"):
        get_sampler("euler")


def test_bad_noise_pyramid():
    process, model, _, _, _side = gaussian_setup(2)
    with pytest.raises(ValueError, match="2 levels"):
        sample_ddim(model, [torch.zeros(1, 3, 8, 8)], process, 2)
