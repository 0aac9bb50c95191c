from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from matryoshka.config import (
    ConfigError,
    apply_overrides,
    deep_merge,
    dump_yaml,
    from_dict,
    load_config,
    load_yaml,
    to_dict,
)
from matryoshka.config.run import RunConfig


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


@dataclass
class Stage:
    levels: int = 1
    steps: int = 100


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class Train:
    steps: int = 1000
    batch_size: int = 8
    optim: Optim = field(default_factory=Optim)
    stages: list[Stage] = field(default_factory=lambda: [Stage(1, 10), Stage(2, 20)])
    loss_weights: dict[str, float] = field(default_factory=lambda: {"l64": 1.0})
    level_scale: dict[int, float] = field(default_factory=dict)


@dataclass
class Data:
    path: str = "data"
    root: Path | None = None
    resolution: int = 64


@dataclass
class Model:
    kind: Literal["unet", "nested_unet"] = "nested_unet"
    channels: list[int] = field(default_factory=lambda: [64, 128])
    dropout: float = 0.0
    ema: float | None = None
    use_fp16: bool = False
    mode: Mode = Mode.FAST


@dataclass
class Experiment:
    name: str = "exp"
    seed: int = 0
    model: Model = field(default_factory=Model)
    train: Train = field(default_factory=Train)
    data: Data = field(default_factory=Data)
    notes: str | None = None


@dataclass
class Required:
    name: str
    size: int = 1


PRESETS = {
    "small": {"model": {"channels": [32, 64]}, "train": {"steps": 10}},
    "big": lambda: {"model": {"channels": [128, 256], "dropout": 0.1}, "seed": 7},
}


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# --------------------------------------------------------------------------- round trip


def test_round_trip_to_dict_dump_load(tmp_path: Path) -> None:
    cfg = from_dict(
        Experiment,
        {
            "name": "run: 1",
            "model": {"kind": "unet", "channels": [8, 16], "ema": 0.999, "use_fp16": True, "mode": "slow"},
            "train": {
                "optim": {"lr": 3e-5, "betas": [0.5, 0.9]},
                "stages": [{"steps": 5}],
                "loss_weights": {"a": 2, "b": 0.5},
                "level_scale": {64: 1.5},
            },
            "data": {"root": "/tmp/pics", "path": "yes"},
            "notes": "1e-4",
        },
    )
    assert cfg.train.optim.betas == (0.5, 0.9)
    assert cfg.train.loss_weights == {"a": 2.0, "b": 0.5} and isinstance(cfg.train.loss_weights["a"], float)
    assert cfg.model.mode is Mode.SLOW and cfg.data.root == Path("/tmp/pics")

    plain = to_dict(cfg)
    assert plain["train"]["optim"]["betas"] == [0.5, 0.9]
    assert plain["model"]["mode"] == "slow" and plain["data"]["root"] == "/tmp/pics"

    out = dump_yaml(cfg, tmp_path / "sub" / "cfg.yaml")
    assert load_yaml(out) == plain
    assert from_dict(Experiment, load_yaml(out)) == cfg
    assert load_config(Experiment, out) == cfg
    assert load_config(Experiment, str(out)) == cfg


def test_defaults_and_none_source() -> None:
    assert load_config(Experiment, None) == Experiment()
    assert from_dict(Experiment, {}) == Experiment()


# --------------------------------------------------------------------------- errors from from_dict


def test_unknown_key_at_depth_two_suggests_closest() -> None:
    msg = _error(from_dict, Experiment, {"train": {"optim": {"lrr": 0.1}}})
    assert "unknown config key 'train.optim.lrr'" in msg
    assert "did you mean 'train.optim.lr'?" in msg
    msg = _error(from_dict, Experiment, {"train": {"stpes": 3}})
    assert msg == "unknown config key 'train.stpes' (did you mean 'train.steps'?)"


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    msg = _error(from_dict, Experiment, {"data": {"zzzzzz": 1}})
    assert "unknown config key 'data.zzzzzz'" in msg and "path, root, resolution" in msg


def test_wrong_type_messages() -> None:
    msg = _error(from_dict, Experiment, {"train": {"steps": "many"}})
    assert "'train.steps'" in msg and "expected int" in msg and "'many'" in msg
    msg = _error(from_dict, Experiment, {"model": {"dropout": "abc"}})
    assert "'model.dropout'" in msg and "expected float" in msg and "'abc'" in msg
    msg = _error(from_dict, Experiment, {"model": {"channels": [32, "x"]}})
    assert "'model.channels.1'" in msg and "expected int" in msg
    msg = _error(from_dict, Experiment, {"train": {"steps": 2.5}})
    assert "'train.steps'" in msg and "2.5" in msg
    msg = _error(from_dict, Experiment, {"train": {"optim": {"betas": [0.9]}}})
    assert "'train.optim.betas'" in msg and "too few items" in msg
    msg = _error(from_dict, Experiment, {"train": {"optim": {"betas": [0.9, 0.9, 0.9]}}})
    assert "'train.optim.betas'" in msg and "at most 2 items" in msg
    msg = _error(from_dict, Experiment, {"train": 5})
    assert "'train'" in msg and "expected Train" in msg
    msg = _error(from_dict, Experiment, {"train": {"loss_weights": {"a": "heavy"}}})
    assert "'train.loss_weights.a'" in msg and "expected float" in msg


def test_numeric_coercions(tmp_path: Path) -> None:
    cfg = from_dict(Experiment, {"model": {"dropout": 0}, "train": {"optim": {"lr": "1e-4"}, "steps": 2.0}})
    assert cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)
    assert cfg.train.optim.lr == 1e-4 and cfg.train.steps == 2 and isinstance(cfg.train.steps, int)
    # YAML 1.2 numbers: PyYAML alone reads `1e5` and `1e-4` as strings
    (tmp_path / "c.yaml").write_text("train:\n  steps: 1e5\n  optim:\n    lr: 1e-4\nnotes: '1e-4'\n")
    cfg = load_config(Experiment, tmp_path / "c.yaml")
    assert cfg.train.steps == 100_000 and cfg.train.optim.lr == 1e-4 and cfg.notes == "1e-4"


def test_bools_must_be_bools() -> None:
    for bad in (1, 0, "1", "yes-please"):
        msg = _error(from_dict, Experiment, {"model": {"use_fp16": bad}})
        assert "'model.use_fp16'" in msg and "expected bool" in msg
    msg = _error(from_dict, Experiment, {"seed": True})
    assert "'seed'" in msg and "expected int" in msg
    assert from_dict(Experiment, {"model": {"use_fp16": "True"}}).model.use_fp16 is True


def test_literal_choices_listed() -> None:
    msg = _error(from_dict, Experiment, {"model": {"kind": "resnet"}})
    assert "'model.kind'" in msg and "'unet', 'nested_unet'" in msg and "'resnet'" in msg
    msg = _error(from_dict, Experiment, {"model": {"mode": "medium"}})
    assert "'model.mode'" in msg and "'fast', 'slow'" in msg


def test_optional_none() -> None:
    cfg = from_dict(Experiment, {"model": {"ema": None}, "notes": None, "data": {"root": None}})
    assert cfg.model.ema is None and cfg.notes is None and cfg.data.root is None
    assert from_dict(Experiment, {"model": {"ema": 0.5}}).model.ema == 0.5
    msg = _error(from_dict, Experiment, {"model": {"ema": "often"}})
    assert "'model.ema'" in msg and "expected float or None" in msg
    msg = _error(from_dict, Experiment, {"name": None})
    assert "'name'" in msg and "expected str" in msg


def test_missing_required_field() -> None:
    msg = _error(from_dict, Required, {"size": 2})
    assert "missing required config key 'name'" in msg
    assert from_dict(Required, {"name": "x"}) == Required("x")


def test_post_init_error_wrapped_with_path() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(Experiment, {"train": {"optim": {"lr": -1}}})
    msg = str(info.value)
    assert "'train.optim'" in msg and "lr must be positive" in msg
    assert info.value.path == "train.optim"
    assert isinstance(info.value.__cause__, ValueError)


# --------------------------------------------------------------------------- overrides


def test_override_parsing() -> None:
    data = apply_overrides(
        {},
        [
            "train.steps=2000",
            "model.channels=[32, 64]",
            "data.path=~/pics",
            "train.loss_weights={l64: 1, l128: 0.5}",
            "train.optim.lr=1e-4",
            "model.use_fp16=true",
            "name=yes",
            "notes=~",
            "model.ema=0.99",
        ],
        Experiment,
    )
    cfg = from_dict(Experiment, data)
    assert cfg.train.steps == 2000
    assert cfg.model.channels == [32, 64]
    assert cfg.data.path == "~/pics"
    assert cfg.train.loss_weights == {"l64": 1.0, "l128": 0.5}
    assert cfg.train.optim.lr == 1e-4
    assert cfg.model.use_fp16 is True
    assert cfg.name == "yes"  # YAML would read `yes` as a bool; string fields keep the text
    assert cfg.notes is None
    assert cfg.model.ema == 0.99


def test_override_does_not_mutate_input() -> None:
    data = {"train": {"steps": 1}}
    out = apply_overrides(data, ["train.steps=2"], Experiment)
    assert data == {"train": {"steps": 1}} and out == {"train": {"steps": 2}}


def test_override_list_of_dataclasses() -> None:
    cfg = load_config(Experiment, None, ["train.stages.1.steps=5"])
    assert cfg.train.stages == [Stage(1, 10), Stage(2, 5)]
    cfg = load_config(Experiment, None, ["train.stages=[{levels: 1, steps: 10}]"])
    assert cfg.train.stages == [Stage(1, 10)]
    msg = _error(load_config, Experiment, None, ["train.stages.5.steps=1"])
    assert "'train.stages.5'" in msg and "out of range" in msg
    msg = _error(load_config, Experiment, None, ["train.stages.x.steps=1"])
    assert "'train.stages'" in msg and "index" in msg
    msg = _error(load_config, Experiment, None, ["train.stages.0.stpes=1"])
    assert "unknown config key 'train.stages.0.stpes'" in msg and "'train.stages.0.steps'" in msg


def test_override_int_dict_keys() -> None:
    cfg = load_config(Experiment, {"train": {"level_scale": {64: 1.0}}}, ["train.level_scale.64=2.0"])
    assert cfg.train.level_scale == {64: 2.0}


def test_override_errors() -> None:
    msg = _error(apply_overrides, {}, ["train.steps"], Experiment)
    assert "train.steps" in msg and "dotted.key=value" in msg
    msg = _error(apply_overrides, {}, ["train.stpes=3"], Experiment)
    assert msg == "unknown config key 'train.stpes' (did you mean 'train.steps'?)"
    msg = _error(apply_overrides, {}, ["seed.x=3"], Experiment)
    assert "'seed'" in msg and "not a section" in msg
    msg = _error(load_config, Experiment, None, ["train.steps=[1"])
    assert "'train.steps'" in msg
    # validated before anything applies: a bad key later in the list fails the whole call
    msg = _error(apply_overrides, {}, ["seed=1", "sed=2"], Experiment)
    assert "did you mean 'seed'?" in msg


# --------------------------------------------------------------------------- presets and files


def test_presets_by_name_and_callable() -> None:
    small = load_config(Experiment, "small", presets=PRESETS)
    assert small.model.channels == [32, 64] and small.train.steps == 10 and small.seed == 0
    big = load_config(Experiment, "big", ["seed=3"], presets=PRESETS)
    assert big.model.channels == [128, 256] and big.model.dropout == 0.1 and big.seed == 3


def test_unknown_preset_lists_available() -> None:
    msg = _error(load_config, Experiment, "smal", presets=PRESETS)
    assert "unknown preset 'smal'" in msg and "did you mean 'small'?" in msg and "big, small" in msg


def test_file_on_top_of_preset(tmp_path: Path) -> None:
    file = tmp_path / "exp.yaml"
    file.write_text("preset: small\nmodel:\n  dropout: 0.2\ntrain:\n  batch_size: 4\n")
    cfg = load_config(Experiment, file, ["train.steps=30"], presets=PRESETS)
    assert cfg.model.channels == [32, 64]  # from the preset, deep-merged
    assert cfg.model.dropout == 0.2 and cfg.train.batch_size == 4  # from the file
    assert cfg.train.steps == 30  # from the override
    # a dumped config is self-contained: it reloads equal without the presets
    out = dump_yaml(cfg, tmp_path / "dumped.yaml")
    assert "preset" not in load_yaml(out)
    assert load_config(Experiment, out) == cfg


def test_file_preset_chain_and_errors(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("preset: big\nname: base\n")
    (tmp_path / "child.yaml").write_text("preset: base.yaml\ntrain: {steps: 7}\n")
    cfg = load_config(Experiment, tmp_path / "child.yaml", presets=PRESETS)
    assert (cfg.name, cfg.seed, cfg.train.steps) == ("base", 7, 7)

    (tmp_path / "bad.yaml").write_text("preset: smal\n")
    msg = _error(load_config, Experiment, tmp_path / "bad.yaml", presets=PRESETS)
    assert "unknown preset 'smal'" in msg and "did you mean 'small'?" in msg and "bad.yaml" in msg

    (tmp_path / "loop.yaml").write_text("preset: loop.yaml\n")
    assert "cycle" in _error(load_config, Experiment, tmp_path / "loop.yaml")

    (tmp_path / "typo.yaml").write_text("model:\n  chanels: [1]\n")
    msg = _error(load_config, Experiment, tmp_path / "typo.yaml")
    assert msg == "unknown config key 'model.chanels' (did you mean 'model.channels'?)"


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    msg = _error(load_yaml, missing)
    assert "not found" in msg and str(missing) in msg
    msg = _error(load_config, Experiment, str(missing), presets=PRESETS)
    assert "not found" in msg and "nope.yaml" in msg

    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  channels: [1, 2\nseed: 3\n")
    msg = _error(load_yaml, broken)
    assert "broken.yaml" in msg and "line 3" in msg

    dup = tmp_path / "dup.yaml"
    dup.write_text("seed: 1\nname: a\nseed: 2\n")
    msg = _error(load_yaml, dup)
    assert "duplicate key 'seed'" in msg and "line 3" in msg

    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert "mapping" in _error(load_yaml, tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(Experiment, tmp_path / "empty.yaml") == Experiment()


def test_deep_merge() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    merged = deep_merge(base, {"a": {"c": [3]}, "e": {"f": 1}})
    assert merged == {"a": {"b": 1, "c": [3]}, "d": 1, "e": {"f": 1}}
    merged["a"]["b"] = 99
    assert base["a"]["b"] == 1


def test_optional_bool_takes_none_but_no_numbers() -> None:
    assert from_dict(RunConfig, {"train": {"channels_last": None}}).train.channels_last is None
    assert from_dict(RunConfig, {"train": {"channels_last": "false"}}).train.channels_last is False
    msg = _error(from_dict, RunConfig, {"train": {"channels_last": 1}})
    assert "'train.channels_last'" in msg and "expected bool" in msg
