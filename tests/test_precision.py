"""train.precision=auto: bf16 autocast only where the CPU runs bf16 natively and faster."""

from pathlib import Path

import pytest
import torch

from matryoshka.training import precision


def test_cpu_flags_parsed_from_cpuinfo(tmp_path: Path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert precision.cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    assert precision.cpu_flags(tmp_path / "missing") == set()


def test_explicit_precision_always_wins(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_pays", lambda: True)
    assert precision.use_bf16("fp32", torch.device("cpu")) is False
    assert precision.use_bf16("fp32", torch.device("cuda")) is False
    monkeypatch.setattr(precision, "cpu_bf16_pays", lambda: False)
    assert precision.use_bf16("bf16", torch.device("cpu")) is True
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        precision.use_bf16("fp16", torch.device("cpu"))


def test_auto_follows_the_hardware(monkeypatch):
    assert precision.use_bf16("auto", torch.device("cuda")) is True
    monkeypatch.setattr(precision, "cpu_bf16_pays", lambda: False)
    assert precision.use_bf16("auto", torch.device("cpu")) is False
    monkeypatch.setattr(precision, "cpu_bf16_pays", lambda: True)
    assert precision.use_bf16("auto", torch.device("cpu")) is True


def test_cpu_without_bf16_flags_never_probes(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(precision, "_time", lambda fn: pytest.fail("no timing without native bf16"))
    precision.cpu_bf16_pays.cache_clear()
    try:
        assert precision.cpu_bf16_pays() is False
    finally:
        precision.cpu_bf16_pays.cache_clear()


@pytest.mark.parametrize("bf16_seconds,expected", [(0.5, True), (0.9, False)])
def test_probe_needs_a_real_speed_up(monkeypatch, bf16_seconds, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    timings = iter([bf16_seconds, 1.0])  # bf16 first, then fp32
    monkeypatch.setattr(precision, "_time", lambda fn: (fn(), next(timings))[1])
    precision.cpu_bf16_pays.cache_clear()
    try:
        assert precision.cpu_bf16_pays() is expected
    finally:
        precision.cpu_bf16_pays.cache_clear()
