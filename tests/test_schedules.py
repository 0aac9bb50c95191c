import math
from dataclasses import replace

import pytest
import torch

from matryoshka.config.presets import tiny
from matryoshka.config.run import DiffusionConfig
from matryoshka.diffusion.schedules import (
    SCHEDULE_KINDS,
    NoiseSchedule,
    linear,
    logsnr_cosine,
    make_schedule,
    squaredcos,
)
from matryoshka.pipeline import build_process

T = 1000


def closed_squaredcos_gamma(t: int, steps: int = T) -> float:
    def abar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    g = 1.0
    for i in range(t):
        g *= 1 - min(1 - abar((i + 1) / steps) / abar(i / steps), 0.999)
    return g


def closed_linear_gamma(t: int, steps: int = T) -> float:
    g = 1.0
    for i in range(t):
        g *= 1 - (1e-4 + (0.02 - 1e-4) * i / (steps - 1))
    return g


def closed_cosine_logsnr(t: int, steps: int = T) -> float:
    u = (t - 1) / (steps - 1)
    b = math.atan(math.exp(-2.5))
    a = math.atan(math.exp(2.5)) - b
    return -2 * math.log(math.tan(a * u + b))


@pytest.mark.parametrize("t", [1, 2, 10, 250, 500, 999, 1000])
def test_closed_forms(t):
    assert squaredcos().gamma(t).item() == pytest.approx(closed_squaredcos_gamma(t), rel=1e-10)
    assert linear().gamma(t).item() == pytest.approx(closed_linear_gamma(t), rel=1e-10)
    assert logsnr_cosine().log_snr(t).item() == pytest.approx(closed_cosine_logsnr(t), abs=1e-9)


def test_table_layout_and_identities():
    for kind in SCHEDULE_KINDS:
        s = make_schedule(kind, 1000)
        assert s.num_steps == 1000 and s.gammas.shape == (1001,)
        assert s.gammas.dtype == torch.float64
        t = torch.arange(0, 1001)
        assert s.gamma(0).item() == 1.0 and s.sigma(0).item() == 0.0
        assert s.log_snr(0).item() == math.inf
        torch.testing.assert_close(s.alpha(t) ** 2 + s.sigma(t) ** 2, torch.ones(1001, dtype=torch.float64))
        assert bool((s.log_snr(t)[1:].diff() < 0).all())  # strictly decreasing log-SNR
        lam = s.log_snr(t[1:])
        torch.testing.assert_close(torch.sigmoid(lam), s.gamma(t[1:]))


def test_cosine_endpoints():
    s = logsnr_cosine()
    assert s.log_snr(1).item() == pytest.approx(5.0, abs=1e-12)
    assert s.log_snr(T).item() == pytest.approx(-5.0, abs=1e-12)


def test_squaredcos_reference_numbers():
    # SPEC §2: about +10.1 at t=1, -12.9 at t=999, -19.8 at t=1000.
    s = squaredcos()
    assert s.log_snr(1).item() == pytest.approx(10.095, abs=1e-3)
    assert s.log_snr(999).item() == pytest.approx(-12.928, abs=1e-3)
    assert s.log_snr(1000).item() == pytest.approx(-19.836, abs=1e-3)


@pytest.mark.parametrize("ratio,power", [(4, 1.0), (16, 1.0), (16, 2.0), (2.5, 0.5)])
def test_shift(ratio, power):
    base = squaredcos()
    sh = base.shifted(ratio, power)
    t = torch.arange(1, T + 1)
    torch.testing.assert_close(sh.log_snr(t), base.log_snr(t) - power * math.log(ratio))
    snr = base.gamma(t) / (1 - base.gamma(t))
    torch.testing.assert_close(sh.gamma(t), 1 / (1 + ratio**power / snr))
    assert sh.gamma(0).item() == 1.0
    assert bool((sh.gamma(t) < base.gamma(t)).all())  # bigger images get more noise


def test_offset_adds_to_log_snr_and_builds_the_process():
    base = squaredcos()
    t = torch.arange(1, T + 1)
    up = base.offset(2 * math.log(4))
    torch.testing.assert_close(up.log_snr(t), base.log_snr(t) + 2 * math.log(4))
    assert up.gamma(0).item() == 1.0
    # The process's levels: the offset applies to the innermost level, and the resolution shift on top.
    config = replace(tiny(), diffusion=DiffusionConfig(logsnr_shift=1.5))
    process = build_process(config)
    inner, outer = process.schedule_for_level(1), process.schedule_for_level(0)
    torch.testing.assert_close(inner.log_snr(t), base.log_snr(t) + 1.5)
    torch.testing.assert_close(outer.log_snr(t), base.log_snr(t) + 1.5 - math.log(2))


def test_shift_identity_and_errors():
    base = squaredcos()
    assert base.shifted(1) is base
    with pytest.raises(ValueError):
        base.shifted(0)


def test_integer_accessor_rejects_floats():
    with pytest.raises(TypeError):
        squaredcos().gamma(torch.tensor([0.5]))


def test_make_schedule_errors():
    with pytest.raises(ValueError, match=r"squaredcos.*logsnr_cosine.*linear"):
        make_schedule("cosine")
    with pytest.raises(ValueError):
        make_schedule("linear", 0)
    with pytest.raises(ValueError):
        NoiseSchedule(torch.tensor([0.9, 0.5]))  # gamma_0 must be 1
    with pytest.raises(ValueError):
        NoiseSchedule(torch.tensor([1.0, 0.5, 0.7]))  # not monotone


def test_short_schedules():
    s = make_schedule("squaredcos", 10)
    assert s.num_steps == 10
    assert s.gamma(3).item() == pytest.approx(closed_squaredcos_gamma(3, 10), rel=1e-12)
