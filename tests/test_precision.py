"""train.precision=auto: bf16 autocast only where the CPU runs bf16 natively and faster; and
train.channels_last, which follows it."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from matryoshka.config.presets import tiny
from matryoshka.data import DataConfig
from matryoshka.models.mp_layers import MPConv
from matryoshka.training import precision
from matryoshka.training.distributed import DistContext
from matryoshka.training.trainer import Trainer

from .test_cli import make_image_folder


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


def test_channels_last_auto_skips_bf16_groupnorm_blocks_on_cpus_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert precision.use_channels_last(None, cpu, bf16=True, magnitude_preserving=False) is False
    assert precision.use_channels_last(None, cpu, bf16=True, magnitude_preserving=True) is True
    assert precision.use_channels_last(None, cpu, bf16=False, magnitude_preserving=False) is True
    assert precision.use_channels_last(None, cuda, bf16=True, magnitude_preserving=False) is True
    assert precision.use_channels_last(True, cpu, bf16=True, magnitude_preserving=False) is True
    assert precision.use_channels_last(False, cuda, bf16=False, magnitude_preserving=True) is False


class RankZeroSays(DistContext):
    """A rank whose rank 0 resolved the precision to ``bf16`` (whatever this rank would say)."""

    def __init__(self, bf16: bool) -> None:
        super().__init__()
        self.bf16 = bf16

    def from_main(self, value):
        return self.bf16 if isinstance(value, bool) else value


@pytest.mark.parametrize(
    "train_precision,magnitude_preserving,channels_last",
    [("fp32", False, True), ("bf16", False, False), ("bf16", True, True)],
)
def test_trainer_lays_out_weights_as_resolved(tmp_path: Path, train_precision, magnitude_preserving, channels_last):
    config = tiny_config(tmp_path, train_precision)
    config = replace(config, model=replace(config.model, magnitude_preserving=magnitude_preserving))
    trainer = Trainer(config, quiet=True)
    convs = (m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d | MPConv))
    conv = next(m for m in convs if m.weight.dim() == 4 and m.weight.shape[-1] == 3)
    assert trainer.channels_last is channels_last
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) is channels_last
    assert conv.weight.is_contiguous() is not channels_last


def test_every_rank_takes_rank_zeros_precision(tmp_path: Path):
    trainer = Trainer(tiny_config(tmp_path, "fp32"), dist=RankZeroSays(bf16=True), quiet=True)
    assert trainer.bf16 is True and trainer.channels_last is False


def tiny_config(tmp_path: Path, train_precision: str):
    config = tiny()
    return replace(
        config,
        run_dir=str(tmp_path / "run"),
        data=DataConfig(source="imagefolder", path=str(make_image_folder(tmp_path / "images")), resolution=16),
        train=replace(config.train, precision=train_precision),
    )
