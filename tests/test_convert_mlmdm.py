"""``mdm convert mlmdm``: ml-mdm configs and checkpoints into our format.

The released models are ~460M parameters each, so for them only the config mapping and
the name/shape mapping (against the reference key lists) are checked, without tensors.
Round trips with real tensors use small configs of the same structure. The ml-mdm
configs below are written here from the released values; they are not Apple's files.
"""

from __future__ import annotations

import argparse
import ast
import copy
import enum
import math
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from matryoshka.cli.convert import add_parser
from matryoshka.diffusion.samplers import get_sampler
from matryoshka.interop.mlmdm import (
    CheckpointFormatError,
    MlmdmConfigError,
    MlmdmError,
    MlmdmMismatchError,
    UnsafeCheckpointError,
    convert_mlmdm,
    convert_state_dict,
    expected_shapes,
    from_mlmdm_key,
    map_mlmdm_keys,
    read_mlmdm_yaml,
    read_weights,
    run_config_from_mlmdm,
    to_mlmdm_key,
)
from matryoshka.models import Conditioning, NestedUNet, model_preset
from matryoshka.pipeline import build_process, load_pipeline
from matryoshka.text.base import TextEmbedding

# Names and shapes of the tensors in ml-mdm's released checkpoints (see its README.md).
REFERENCE = Path(__file__).resolve().parent / "data" / "mlmdm"


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mdm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


# ---------------------------------------------------------------------------- released configs


def _inner64(nested: bool) -> dict:
    return {
        "attention_levels": [1, 2],
        "conditioning_feature_dim": -1,
        "conditioning_feature_proj_dim": 2048,
        "masked_cross_attention": 0,
        "micro_conditioning": "scale:64",
        "nesting": nested,
        "num_attention_layers": [0, 1, 5],
        "num_lm_head_layers": 0,
        "num_resnets_per_resolution": [2, 2, 2],
        "resolution_channels": [256, 512, 768],
        "skip_cond_emb": False,
        "skip_mid_blocks": False,
        "temporal_mode": False,
        "resnet_config": {
            "dropout": 0.0,
            "num_channels": -1,
            "num_groups_norm": 32,
            "output_channels": -1,
            "use_attention_ffn": True,
        },
    }


def _outer(channels: list[int], scale: int, skip_normalization: bool, inner: dict, nested: bool) -> dict:
    return {
        "attention_levels": [],
        "conditioning_feature_dim": -1,
        "conditioning_feature_proj_dim": 2048 if scale == 1024 else -1,
        "freeze_inner_unet": False,
        "initialize_inner_with_pretrained": None,
        "inner_config": inner,
        "interp_conditioning": False,
        "masked_cross_attention": 1,
        "micro_conditioning": f"scale:{scale}",
        "nesting": nested,
        "num_attention_layers": [0, 0, 0],
        "num_resnets_per_resolution": [2, 2, 1],
        "resnet_config": {"dropout": 0.0, "num_groups_norm": 32, "use_attention_ffn": False},
        "resolution_channels": channels,
        "skip_cond_emb": True,
        "skip_inner_unet_input": False,
        "skip_mid_blocks": True,
        "skip_normalization": skip_normalization,
        "temporal_dim": 1024,
    }


def _sampler(shifted: bool, power: int | None = None) -> dict:
    config = {
        "num_diffusion_steps": 1000,
        "reproject_signal": False,
        "prediction_type": "V_PREDICTION",
        "loss_target_type": "DDPM",
        "schedule_type": "DEEPFLOYD",
        "schedule_shifted": shifted,
    }
    if power is not None:
        config["schedule_shifted_power"] = power
    return config


def released_yaml(kind: str) -> str:
    """YAML text with the released configs' model/diffusion values and their duplicate keys."""
    if kind == "64":
        body = {
            "sample_image_size": 64,
            "model": "unet",
            "text_model": "google/flan-t5-xl",
            "batch_size": 32,
            "unet_config": _inner64(False),
            "diffusion_config": {
                "sampler_config": {**_sampler(False), "threshold_function": "CLIP", "rescale_schedule": 1.0},
                "model_output_scale": 0.0,
                "use_vdm_loss_weights": False,
            },
            "reader_config": {"image_size": 64, "max_caption_length": 512, "max_token_length": 128},
            "lr": 5.0e-05,
            "warmup_steps": 10000,
            "gradient_clip_norm": 2,
        }
        # An earlier diffusion_config with options that would be refused: the later one must win.
        first = "diffusion_config:\n  sampler_config:\n    loss_target_type: HA_STYLE\n    predict_variances: false\n"
        return first + "batch_size: 16\n" + yaml.safe_dump(body, sort_keys=False)
    if kind == "256":
        body = {
            "sample_image_size": 256,
            "model": "nested_unet",
            "text_model": "google/flan-t5-xl",
            "diffusion_config": {
                "sampler_config": {**_sampler(True), "rescale_signal": 1},
                "model_output_scale": 0,
                "use_vdm_loss_weights": False,
                "use_double_loss": True,
                "no_use_residual": True,
            },
            "unet_config": _outer([64, 128, 256], 256, True, _inner64(True), False),
            "reader_config": {
                "image_size": 256,
                "max_token_length": 128,
                "append_eos": True,
                "prepad_caption_with_space": True,
                "padding_token": "<pad>",
            },
            "mixed_ratio": "2:1",
        }
        return yaml.safe_dump(body, sort_keys=False)
    body = {
        "sample_image_size": 1024,
        "model": "nested2_unet",
        "text_model": "google/flan-t5-xl",
        "diffusion_config": {
            "sampler_config": {**_sampler(True, 2), "rescale_signal": 1},
            "model_output_scale": 0,
            "use_vdm_loss_weights": False,
            "use_double_loss": True,
            "no_use_residual": True,
        },
        "unet_config": _outer(
            [32, 32, 64], 1024, True, _outer([64, 128, 256], 256, False, _inner64(True), True), False
        ),
        "multi_res_weights": "16:4:1",
    }
    reader = (
        "reader_config:\n  image_size: 1024\n  max_caption_length: -1\n  max_caption_length: 512\n"
        "  max_token_length: 128\n"
    )
    return yaml.safe_dump(body, sort_keys=False) + reader


RELEASED = {"64": "mlmdm-64", "256": "mlmdm-256", "1024": "mlmdm-1024"}


@pytest.mark.parametrize("kind", list(RELEASED))
def test_released_configs_map_to_the_released_architectures(kind, tmp_path):
    path = tmp_path / f"cc12m_{kind}.yaml"
    path.write_text(released_yaml(kind))
    raw, notes = read_mlmdm_yaml(path)
    conversion = run_config_from_mlmdm(raw)
    config = conversion.config
    preset = model_preset(RELEASED[kind])
    assert expected_shapes(config.model) == expected_shapes(preset)
    for ours, theirs in zip(config.model.levels, preset.levels, strict=True):
        assert ours.normalize_input == theirs.normalize_input
        assert ours.micro_conditioning == theirs.micro_conditioning
    assert config.model.text_dim == 2048 and config.model.text_proj_dim == 2048
    assert config.model.text_attention_mask is False  # masked_cross_attention: 0 on the innermost UNet
    assert config.data.resolution == int(kind)
    text = config.text
    assert (text.encoder, text.max_length, text.mlmdm_compat) == ("google/flan-t5-xl", 128, "sample")
    diffusion = config.diffusion
    assert (diffusion.schedule, diffusion.num_steps, diffusion.prediction, diffusion.loss_target) == (
        "squaredcos",
        1000,
        "v",
        "eps",
    )
    assert diffusion.shift_power == (2.0 if kind == "1024" else 1.0)
    # ml-mdm's '16:4:1' weighs the highest resolution most; ours lists the innermost level first.
    assert diffusion.level_loss_weights == ([1.0, 4.0, 16.0] if kind == "1024" else [])
    assert diffusion.mixed_ratio == (pytest.approx(2 / 3) if kind == "256" else None)
    assert conversion.sampling["threshold_function"] == "CLIP" and conversion.sampling["sampler"] == "ddim"
    assert conversion.sampling["steps"] == {"64": 50, "256": 100, "1024": 250}[kind]
    if kind == "64":
        assert any("'diffusion_config'" in note for note in notes)
        assert any("'batch_size'" in note for note in notes)
        assert config.train.batch_size == 32 and config.train.lr == 5e-5
    if kind == "1024":
        assert any("'max_caption_length'" in note for note in notes)
        assert conversion.text_encoder["max_caption_length"] == 512
        assert any("multi_res_weights" in note for note in conversion.notes)


@pytest.mark.parametrize("kind", list(RELEASED))
def test_every_released_tensor_lands_on_a_model_tensor_of_the_same_shape(kind, tmp_path):
    shapes = {}
    for line in (REFERENCE / f"cc12m_{kind}x{kind}_keys.txt").read_text().splitlines():
        key, shape = line.split("\t")
        shapes[key] = ast.literal_eval(shape)
    path = tmp_path / "config.yaml"
    path.write_text(released_yaml(kind))
    model = run_config_from_mlmdm(read_mlmdm_yaml(path)[0]).config.model
    mapping = map_mlmdm_keys(shapes, model)
    expected = expected_shapes(model)
    assert sorted(mapping.values()) == sorted(expected)
    assert all(expected[ours] == tuple(shapes[key]) for key, ours in mapping.items())
    # A single missing or wrong tensor is reported by its ml-mdm name.
    broken = dict(shapes)
    victim = next(k for k in shapes if "kv_cond.weight" in k)
    broken[victim] = (1, 1)
    del broken["conv_in.weight"]
    with pytest.raises(MlmdmMismatchError) as info:
        map_mlmdm_keys(broken, model)
    assert "conv_in.weight" in str(info.value) and victim in str(info.value)


# ---------------------------------------------------------------------------- tiny configs of the same structure

TEXT_DIM = 24


def tiny_mlmdm_config(levels: int) -> dict:
    """ml-mdm config of the released structure, small: 8px innermost UNet, x2 nesting."""
    inner = {
        "attention_levels": [0, 1],
        "num_attention_layers": [0, 2],
        "num_resnets_per_resolution": [1, 2],
        "resolution_channels": [32, 64],
        "conditioning_feature_dim": TEXT_DIM,
        "conditioning_feature_proj_dim": TEXT_DIM,
        "masked_cross_attention": 0,
        "micro_conditioning": "scale:8",
        "nesting": levels > 1,
        "skip_cond_emb": False,
        "skip_mid_blocks": False,
        "num_lm_head_layers": 0,
        "resnet_config": {"num_groups_norm": 32, "dropout": 0.0, "use_attention_ffn": True},
    }
    config = inner
    for level in range(1, levels):
        side = 8 * 2**level
        config = {
            # the middle level of three cross-attends too (released outer levels do not)
            "attention_levels": [1] if level == 1 and levels == 3 else [],
            "num_attention_layers": [0, 1] if level == 1 and levels == 3 else [0, 0],
            "num_resnets_per_resolution": [1, 1],
            "resolution_channels": [32, 32],
            "conditioning_feature_dim": -1,
            "conditioning_feature_proj_dim": TEXT_DIM if level == 1 else -1,
            "masked_cross_attention": 1,
            "micro_conditioning": f"scale:{side}",
            "nesting": level < levels - 1,
            "skip_cond_emb": True,
            "skip_mid_blocks": True,
            "skip_normalization": level == levels - 1,
            "skip_inner_unet_input": False,
            "temporal_dim": 128,
            "freeze_inner_unet": False,
            "initialize_inner_with_pretrained": None,
            "interp_conditioning": False,
            "resnet_config": {"num_groups_norm": 32, "dropout": 0.0, "use_attention_ffn": False},
            "inner_config": config,
        }
    top = 8 * 2 ** (levels - 1)
    extra = {"mixed_ratio": "2:1"} if levels == 2 else {}
    return {
        **extra,
        "model": {1: "unet", 2: "nested_unet", 3: "nested2_unet"}[levels],
        "text_model": "test/tiny-encoder",
        "sample_image_size": top,
        "unet_config": config,
        "diffusion_config": {
            "sampler_config": {**_sampler(True, 2 if levels == 3 else 1), "threshold_function": "CLIP"},
            "model_output_scale": 0,
            "use_vdm_loss_weights": False,
            **({"use_double_loss": True, "no_use_residual": True} if levels > 1 else {}),
        },
        "reader_config": {"image_size": top, "max_token_length": 16},
        "lr": 1e-4,
    }


def synthetic_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of every shape the model needs, under ml-mdm's names."""
    model = run_config_from_mlmdm(config).config.model
    generator = torch.Generator().manual_seed(seed)
    return {
        to_mlmdm_key(name): torch.randn(shape, generator=generator) * 0.2
        for name, shape in expected_shapes(model).items()
    }


# Stand-ins for ml-mdm's classes under their old module names, only present while saving.
class ScheduleType(enum.Enum):
    COSINE = 0
    DDPM = 2
    DEEPFLOYD = 3


class PredictionType(enum.Enum):
    DDPM = 3
    DDIM = 4
    V_PREDICTION = 5


class ThresholdType(enum.Enum):
    NONE = 0
    CLIP = 1


FAKE_CLASSES = {
    "samplers": {
        "ScheduleType": ScheduleType,
        "PredictionType": PredictionType,
        "ThresholdType": ThresholdType,
        "SamplerConfig": type("SamplerConfig", (), {}),
    },
    "models.unet": {"UNetConfig": type("UNetConfig", (), {}), "ResNetConfig": type("ResNetConfig", (), {})},
    "models.nested_unet": {
        "NestedUNetConfig": type("NestedUNetConfig", (), {}),
        "Nested2UNetConfig": type("Nested2UNetConfig", (), {}),
    },
    "diffusion": {"NestedDiffusionConfig": type("NestedDiffusionConfig", (), {})},
    "reader": {"ReaderConfig": type("ReaderConfig", (), {})},
}
ENUM_FIELDS = {
    "schedule_type": ScheduleType,
    "prediction_type": PredictionType,
    "loss_target_type": PredictionType,
    "threshold_function": ThresholdType,
}


def _instance(module: str, name: str, fields: dict):
    cls = FAKE_CLASSES[module][name]
    obj = cls.__new__(cls)
    obj.__dict__.update(fields)
    return obj


def mlmdm_args(config: dict) -> argparse.Namespace:
    """ml-mdm's saved ``args``: dataclasses and enums of old module names inside a Namespace."""

    def unet(section: dict):
        fields = dict(section)
        fields["resnet_config"] = _instance("models.unet", "ResNetConfig", section.get("resnet_config", {}))
        if "inner_config" in section:
            fields["inner_config"] = unet(section["inner_config"])
            return _instance("models.nested_unet", "NestedUNetConfig", fields)
        return _instance("models.unet", "UNetConfig", fields)

    sampler = {
        key: ENUM_FIELDS[key][value] if key in ENUM_FIELDS else value
        for key, value in config["diffusion_config"]["sampler_config"].items()
    }
    diffusion = dict(config["diffusion_config"], sampler_config=_instance("samplers", "SamplerConfig", sampler))
    if config["model"] != "unet":
        diffusion.setdefault("mixed_ratio", None)  # every dataclass field is saved
    return argparse.Namespace(
        model=config["model"],
        text_model=config["text_model"],
        unet_config=unet(config["unet_config"]),
        diffusion_config=_instance("diffusion", "NestedDiffusionConfig", diffusion),
        reader_config=_instance("reader", "ReaderConfig", config["reader_config"]),
        lr=config["lr"],
        # ml-mdm's parser leaves top-level YAML keys such as mixed_ratio as loose attributes
        **({"mixed_ratio": config["mixed_ratio"]} if "mixed_ratio" in config else {}),
        config_path=[Path("configs/models/tiny.yaml")],
        output_dir="/mnt/data/outputs",
    )


@pytest.fixture
def fake_mlmdm_modules(monkeypatch):
    """Register the stand-in classes under ml-mdm's old module names (for pickling only)."""
    monkeypatch.setitem(sys.modules, "models", types.ModuleType("models"))
    for module, classes in FAKE_CLASSES.items():
        mod = types.ModuleType(module)
        for name, cls in classes.items():
            cls.__module__, cls.__qualname__ = module, name
            setattr(mod, name, cls)
        monkeypatch.setitem(sys.modules, module, mod)
    yield
    # monkeypatch removes the modules again: conversion must not need them.


def save_mlmdm_checkpoint(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    torch.save(
        {
            "state_dict": tensors,
            "batch_num": 12345,
            "loss": 0.0625,
            "exp_avg_loss": 0.07,
            "exp_avg_loss_var": np.float64(0.25),
            "args": mlmdm_args(config),
        },
        path,
    )


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class _TrapModule(types.ModuleType):
    """A module whose every attribute access fails: proves that loading never resolves ml-mdm's classes."""

    def __getattr__(self, name):
        raise AssertionError(f"the converter looked up {self.__name__}.{name}")


@pytest.fixture
def tiny_checkpoint(tmp_path, fake_mlmdm_modules, monkeypatch, request):
    levels = getattr(request, "param", 2)
    config = tiny_mlmdm_config(levels)
    tensors = synthetic_state_dict(config)
    save_mlmdm_checkpoint(tmp_path / "vis_model.pth", config, tensors)
    for module in ["models", *FAKE_CLASSES]:
        monkeypatch.setitem(sys.modules, module, _TrapModule(module))
    return tmp_path / "vis_model.pth", write_yaml(tmp_path / "tiny.yaml", config), config, tensors


def assert_converted(out: Path, tensors: dict[str, torch.Tensor], levels: int, step: int = 12345):
    pipe = load_pipeline(out, device="cpu")
    assert pipe.model.config.num_levels == levels and pipe.step == step
    ours = pipe.model.state_dict()
    assert len(ours) == len(tensors)
    for key, value in tensors.items():
        assert torch.equal(ours[from_mlmdm_key(key)], value), key
    model_file = load_file(out / "model.safetensors")
    assert all(torch.equal(model_file[from_mlmdm_key(k)], v) for k, v in tensors.items())
    return pipe


@pytest.mark.parametrize("tiny_checkpoint", [1, 2, 3], indirect=True)
def test_round_trip_through_the_cli(tiny_checkpoint, tmp_path, capsys):
    pth, config_file, config, tensors = tiny_checkpoint
    levels = {"unet": 1, "nested_unet": 2, "nested2_unet": 3}[config["model"]]
    out = tmp_path / "converted"
    assert cli(["convert", "mlmdm", "--checkpoint", str(pth), "--config", str(config_file), "--out", str(out)]) == 0
    assert "converted" in capsys.readouterr().out
    pipe = assert_converted(out, tensors, levels)
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["num_levels"] == levels and state["source"]["format"] == "ml-mdm"
    assert state["source"]["extras"]["exp_avg_loss_var"] == 0.25
    assert state["source"]["sampling"]["guidance"] == 7.5
    assert "samplers.ScheduleType" in state["source"]["inert_records"]
    assert pipe.process.shift_power == (2.0 if levels == 3 else 1.0)
    assert pipe.config.model.levels[0].micro_conditioning == {"scale": 8.0}
    # The loaded model runs on given noisy pyramids, timesteps and text embeddings.
    sides = pipe.config.model.level_sides(pipe.config.data.resolution)
    z = [torch.randn(2, 3, s, s) for s in sides]
    text = torch.randn(2, 5, TEXT_DIM)
    out_levels = pipe.model(z, torch.tensor([999.0, 10.0]), Conditioning(text=text))
    assert [o.shape for o in out_levels] == [zi.shape for zi in z]
    assert all(torch.isfinite(o).all() for o in out_levels)


def test_config_defaults_to_the_arguments_saved_in_the_checkpoint(tiny_checkpoint, tmp_path):
    pth, config_file, _, tensors = tiny_checkpoint
    result = convert_mlmdm(pth, None, tmp_path / "from-args")
    assert_converted(result.out, tensors, 2)
    from_yaml = run_config_from_mlmdm(read_mlmdm_yaml(config_file)[0]).config
    assert result.config.model == from_yaml.model and result.config.diffusion == from_yaml.diffusion
    assert result.config.diffusion.mixed_ratio == pytest.approx(2 / 3)


def test_plain_state_dict_and_safetensors_inputs(tmp_path):
    config = tiny_mlmdm_config(2)
    tensors = synthetic_state_dict(config, seed=3)
    config_file = write_yaml(tmp_path / "tiny.yaml", config)
    torch.save(tensors, tmp_path / "plain.pth")
    save_file(tensors, tmp_path / "weights.safetensors")
    for name in ("plain.pth", "weights.safetensors"):
        out = tmp_path / f"out-{name}"
        assert (
            cli(
                [
                    "convert",
                    "mlmdm",
                    "--checkpoint",
                    str(tmp_path / name),
                    "--config",
                    str(config_file),
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        assert_converted(out, tensors, 2, step=0)
    # A plain state dict has no saved arguments: the YAML is required.
    with pytest.raises(MlmdmConfigError, match="--config"):
        cli(["convert", "mlmdm", "--checkpoint", str(tmp_path / "plain.pth"), "--out", str(tmp_path / "x")])


def test_state_dict_only_writes_just_the_weights(tiny_checkpoint, tmp_path):
    pth, config_file, _, tensors = tiny_checkpoint
    out = tmp_path / "weights"
    cli(
        [
            "convert",
            "mlmdm",
            "--checkpoint",
            str(pth),
            "--config",
            str(config_file),
            "--out",
            str(out),
            "--state-dict-only",
        ]
    )
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors"]
    weights = load_file(out / "model.safetensors")
    assert set(weights) == {from_mlmdm_key(k) for k in tensors}


# ---------------------------------------------------------------------------- bad files: refused, nothing written


def _nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".converting-" in p.name]


@pytest.mark.parametrize("damage", ["missing", "wrong_shape", "unexpected", "nan"])
def test_tensor_mismatches_are_refused_by_name(damage, tmp_path):
    config = tiny_mlmdm_config(2)
    tensors = synthetic_state_dict(config)
    victim = "inner_unet.down_blocks.1.attn.0.kv_cond.weight"
    assert victim in tensors
    if damage == "missing":
        del tensors[victim]
    elif damage == "wrong_shape":
        tensors[victim] = torch.zeros(3, 3)
    elif damage == "unexpected":
        tensors["inner_unet.lm_head.0.weight"] = torch.zeros(2)
    else:
        tensors[victim][0, 0] = float("nan")
    torch.save({"state_dict": tensors}, tmp_path / "bad.pth")
    out = tmp_path / "out"
    with pytest.raises(MlmdmError) as info:
        cli(
            [
                "convert",
                "mlmdm",
                "--checkpoint",
                str(tmp_path / "bad.pth"),
                "--config",
                str(write_yaml(tmp_path / "c.yaml", config)),
                "--out",
                str(out),
            ]
        )
    message = str(info.value)
    expected = {
        "missing": "missing (1)",
        "wrong_shape": "wrong shape (1)",
        "unexpected": "unexpected (1)",
        "nan": "NaN",
    }[damage]
    assert expected in message
    assert (victim if damage != "unexpected" else "inner_unet.lm_head.0.weight") in message
    _nothing_written(tmp_path, out)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evaluates:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


@pytest.mark.parametrize("variant", ["zip", "legacy", "raw-pickle", "eval"])
def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(variant, tmp_path):
    marker = tmp_path / "executed"
    tensors = {"conv_in.weight": torch.zeros(1)}
    payload = {"state_dict": tensors, "args": _RunsCode(marker) if variant != "eval" else _Evaluates()}
    bad = tmp_path / "vis_model.pth"
    if variant in ("zip", "eval"):
        torch.save(payload, bad)
    elif variant == "legacy":
        torch.save(payload, bad, _use_new_zipfile_serialization=False)
    else:
        bad.write_bytes(pickle.dumps(payload["args"]))
    config = write_yaml(tmp_path / "c.yaml", tiny_mlmdm_config(1))
    out = tmp_path / "out"
    with pytest.raises(UnsafeCheckpointError) as info:
        cli(["convert", "mlmdm", "--checkpoint", str(bad), "--config", str(config), "--out", str(out)])
    assert "Nothing from the file was executed" in str(info.value)
    if variant == "zip":
        assert "system" in str(info.value)
    if variant == "eval":
        assert "builtins.eval" in str(info.value)
    assert not marker.exists()
    _nothing_written(tmp_path, out)


def test_other_files_are_refused_clearly(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", tiny_mlmdm_config(1))
    diffusers = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({"down_blocks.0.resnets.0.time_emb_proj.weight": torch.zeros(2, 2)}, diffusers)
    with pytest.raises(CheckpointFormatError, match="diffusers"):
        read_weights(diffusers)
    torch.save({"model": {"a": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointFormatError, match="neither an ml-mdm checkpoint"):
        read_weights(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError):
        cli(
            [
                "convert",
                "mlmdm",
                "--checkpoint",
                str(tmp_path / "nope.pth"),
                "--config",
                str(config),
                "--out",
                str(tmp_path / "out"),
            ]
        )
    with pytest.raises(FileNotFoundError):
        read_mlmdm_yaml(tmp_path / "nope.yaml")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    torch.save(synthetic_state_dict(tiny_mlmdm_config(1)), tmp_path / "ok.pth")
    with pytest.raises(MlmdmError, match="not empty"):
        cli(
            [
                "convert",
                "mlmdm",
                "--checkpoint",
                str(tmp_path / "ok.pth"),
                "--config",
                str(config),
                "--out",
                str(tmp_path / "taken"),
            ]
        )


# ---------------------------------------------------------------------------- options that change the computation


def _edit(config: dict, path: str, value) -> dict:
    config = copy.deepcopy(config)
    *parents, last = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[last] = value
    return config


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("diffusion_config.model_output_scale", 1.0, "model_output_scale"),
        ("diffusion_config.no_use_residual", False, "no_use_residual"),
        ("diffusion_config.sampler_config.schedule_shifted", False, "schedule_shifted"),
        ("diffusion_config.sampler_config.schedule_type", "SIGMOID", "schedule_type"),
        ("diffusion_config.sampler_config.rescale_schedule", 2.0, "rescale_schedule"),
        ("diffusion_config.sampler_config.beta_end", 0.5, "DDPM betas"),
        ("unet_config.inner_config.temporal_mode", True, "temporal_mode"),
        ("unet_config.inner_config.num_lm_head_layers", 2, "num_lm_head_layers"),
        ("unet_config.inner_config.resnet_config.num_groups_norm", 0, "num_groups_norm must be positive"),
        ("unet_config.inner_config.skip_mid_blocks", True, "skip_mid_blocks"),
        ("unet_config.skip_mid_blocks", False, "skip_mid_blocks"),
        ("unet_config.skip_inner_unet_input", True, "skip_inner_unet_input"),
        ("unet_config.temporal_dim", 256, "temporal_dim"),
        ("unet_config.resolution_chanels", [32, 32], "did you mean 'resolution_channels'"),
        ("diffusion_config.sampler_config.predict_variances", False, "predict_variances"),
        ("model", "nested2_unet", "unet_config nests 2"),
        ("categorical_conditioning", 1, "categorical_conditioning"),
    ],
)
def test_unsupported_options_are_refused(path, value, message):
    config = tiny_mlmdm_config(2)
    if path == "diffusion_config.sampler_config.beta_end":
        config = _edit(config, "diffusion_config.sampler_config.schedule_type", "DDPM")
    with pytest.raises(MlmdmConfigError, match=message):
        run_config_from_mlmdm(_edit(config, path, value))


def test_training_only_differences_need_consent():
    config = _edit(tiny_mlmdm_config(2), "diffusion_config.use_vdm_loss_weights", True)
    with pytest.raises(MlmdmConfigError, match="--ignore-training-options"):
        run_config_from_mlmdm(config)
    conversion = run_config_from_mlmdm(config, strict_training=False)
    assert any("use_vdm_loss_weights" in note for note in conversion.notes)
    # mixed_ratio below the top level cannot be expressed; at the top it can.
    three = tiny_mlmdm_config(3)
    with pytest.raises(MlmdmConfigError, match="mixed_ratio"):
        run_config_from_mlmdm(_edit(three, "diffusion_config.mixed_ratio", "1:1:1"))
    top_only = run_config_from_mlmdm(_edit(three, "diffusion_config.mixed_ratio", "1:3:0"))
    assert top_only.config.diffusion.mixed_ratio == 0.25


def test_text_width_comes_from_the_encoder_name():
    config = tiny_mlmdm_config(1)
    config["unet_config"]["conditioning_feature_dim"] = -1
    with pytest.raises(MlmdmConfigError, match="--text-dim"):
        run_config_from_mlmdm(config)
    assert run_config_from_mlmdm(config, text_dim=TEXT_DIM).config.model.text_dim == TEXT_DIM
    config["text_model"] = "google/flan-t5-base"
    conversion = run_config_from_mlmdm(config)
    assert conversion.config.model.text_dim == 768 and conversion.config.model.text_proj_dim == TEXT_DIM


def test_other_group_counts_keep_32_groups_in_attention():
    """ml-mdm's attention and feed-forward GroupNorms have 32 groups whatever num_groups_norm says."""
    config = _edit(tiny_mlmdm_config(2), "unet_config.inner_config.resnet_config.num_groups_norm", 8)
    config = _edit(config, "unet_config.resnet_config.num_groups_norm", 16)
    model = run_config_from_mlmdm(config).config.model
    assert [(level.norm_groups, level.attention_groups) for level in model.levels] == [(8, 32), (16, 32)]
    net = NestedUNet(model)
    assert net.inner_unet.down_blocks[0].resnets[0].norm1.num_groups == 8
    assert net.inner_unet.down_blocks[1].attn[0].norm.num_groups == 32
    assert net.inner_unet.down_blocks[1].attn[0].ffn[0].num_groups == 32
    assert net.inner_unet.mid_blocks[0].attn[0].norm.num_groups == 32
    # At 32 groups the default (attention follows norm_groups) already holds: config.yaml is unchanged.
    assert run_config_from_mlmdm(tiny_mlmdm_config(2)).config.model.levels[0].attention_norm_groups is None


def test_text_width_comes_from_the_checkpoint_when_the_config_disagrees(tmp_path, fake_mlmdm_modules):
    config = tiny_mlmdm_config(2)
    tensors = synthetic_state_dict(config)
    save_mlmdm_checkpoint(tmp_path / "vis_model.pth", config, tensors)
    # The YAML names an encoder of another width (and declares none): the tensors decide.
    yaml_config = _edit(config, "text_model", "google/flan-t5-base")
    yaml_config = _edit(yaml_config, "unet_config.inner_config.conditioning_feature_dim", -1)
    result = convert_mlmdm(tmp_path / "vis_model.pth", write_yaml(tmp_path / "c.yaml", yaml_config), tmp_path / "out")
    assert result.config.model.text_dim == TEXT_DIM
    assert any(f"{TEXT_DIM}-wide text tokens" in note and "flan-t5-base" in note for note in result.notes)
    assert_converted(result.out, tensors, 2)
    # An encoder of the checkpoint's width saved in its arguments names text.encoder.
    assert result.config.text.encoder == "google/flan-t5-base"
    assert any("set text.encoder" in note for note in result.notes)
    one_level = _edit(tiny_mlmdm_config(1), "text_model", "google/flan-t5-small")
    save_mlmdm_checkpoint(tmp_path / "small.pth", one_level, synthetic_state_dict(one_level))
    yaml_config = _edit(one_level, "text_model", "google/flan-t5-base")
    yaml_file = write_yaml(tmp_path / "c1.yaml", yaml_config)
    result = convert_mlmdm(tmp_path / "small.pth", yaml_file, tmp_path / "out-small")
    assert (result.config.model.text_dim, result.config.text.encoder) == (512, "google/flan-t5-small")
    # --text-dim still wins, and a wrong one is refused by the tensor shapes.
    with pytest.raises(MlmdmMismatchError, match="wrong shape"):
        convert_mlmdm(tmp_path / "small.pth", tmp_path / "c1.yaml", tmp_path / "out-bad", text_dim=768)


# ---------------------------------------------------------------------------- ml-mdm's layouts, by hand


def _group_norm(x, weight, bias, groups=32):
    return F.group_norm(x, groups, weight, bias, eps=1e-5)


def test_attention_and_resnet_follow_mlmdm_layouts_by_hand():
    """q|k|v along channels, head h owns channels [h*C/8, (h+1)*C/8), kv_cond is k|v, time_layer is scale|shift."""
    torch.manual_seed(0)
    config = tiny_mlmdm_config(1)
    tensors = synthetic_state_dict(config, seed=7)
    conversion = run_config_from_mlmdm(config)
    model = NestedUNet(conversion.config.model).eval()
    model.load_state_dict(convert_state_dict(tensors, conversion.config.model))

    # --- attention: stage 1 has 2 layers after each ResNet; take the second one.
    prefix = "down_blocks.1.attn.1."
    p = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    channels, heads, width = 64, 8, 8
    x = torch.randn(2, channels, 4, 4)
    tokens = torch.randn(2, 5, TEXT_DIM)
    h = _group_norm(x, p["norm.weight"], p["norm.bias"]).flatten(2)  # (B, C, N)
    qkv = torch.einsum("oc,bcn->bon", p["qkv.weight"][:, :, 0, 0], h) + p["qkv.bias"][None, :, None]
    q, k, v = qkv[:, :channels], qkv[:, channels : 2 * channels], qkv[:, 2 * channels :]
    t = F.layer_norm(tokens, (TEXT_DIM,), p["norm_cond.weight"], p["norm_cond.bias"])
    kv = t @ p["kv_cond.weight"].T + p["kv_cond.bias"]  # (B, L, 2C)
    k_text, v_text = kv[..., :channels], kv[..., channels:]
    out = torch.zeros_like(q)
    for head in range(heads):
        c = slice(head * width, (head + 1) * width)
        self_w = torch.softmax(torch.einsum("bcn,bcm->bnm", q[:, c], k[:, c]) / math.sqrt(width), dim=-1)
        out[:, c] += torch.einsum("bnm,bcm->bcn", self_w, v[:, c])
        text_w = torch.softmax(torch.einsum("bcn,blc->bnl", q[:, c], k_text[..., c]) / math.sqrt(width), dim=-1)
        out[:, c] += torch.einsum("bnl,blc->bcn", text_w, v_text[..., c])
    y = x + (
        torch.einsum("oc,bcn->bon", p["proj_out.weight"][:, :, 0, 0], out) + p["proj_out.bias"][None, :, None]
    ).reshape(x.shape)
    hidden = F.conv2d(_group_norm(y, p["ffn.0.weight"], p["ffn.0.bias"]), p["ffn.1.weight"], p["ffn.1.bias"])
    expected = y + F.conv2d(F.gelu(hidden), p["ffn.3.weight"], p["ffn.3.bias"])
    with torch.no_grad():
        actual = model.down_blocks[1].attn[1](x, tokens)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)

    # --- ResNet with a 1x1 skip (32 -> 64 channels): time_layer output is scale | shift.
    prefix = "down_blocks.1.resnets.0."
    p = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    x = torch.randn(2, 32, 4, 4)
    emb = torch.randn(2, 128)
    scale_shift = F.silu(emb) @ p["time_layer.weight"].T + p["time_layer.bias"]
    scale, shift = scale_shift[:, :64, None, None], scale_shift[:, 64:, None, None]
    h = F.silu(_group_norm(x, p["norm1.weight"], p["norm1.bias"]))
    h = F.conv2d(h, p["conv1.weight"], p["conv1.bias"], padding=1)
    h = F.silu(_group_norm(h, p["norm2.weight"], p["norm2.bias"]) * (1 + scale) + shift)
    h = F.conv2d(h, p["conv2.weight"], p["conv2.bias"], padding=1)
    expected = h + F.conv2d(x, p["conv3.weight"], p["conv3.bias"])
    with torch.no_grad():
        actual = model.down_blocks[1].resnets[0](x, emb)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def _sample(model, process, spacing: str, sampling: dict, text: torch.Tensor, negative: torch.Tensor):
    """ml-mdm's demo sampling (guidance against the encoded negative prompt), 3 steps, from seed 0."""
    generator = torch.Generator().manual_seed(0)
    noise = process.initial_noise(1, 3, 16, generator=generator)
    return get_sampler(sampling["sampler"])(
        model,
        noise,
        process,
        3,
        cond=Conditioning(text=text),
        uncond=Conditioning(text=negative),
        guidance=sampling["guidance"],
        generator=generator,
        clip_x0=sampling["clip_x0"],
        dynamic_threshold=sampling["dynamic_threshold"],
        eta=sampling["eta"],
        spacing=spacing,
    )


def test_converted_model_samples_like_the_original_weights(tmp_path):
    """The converted checkpoint samples what our model samples with ml-mdm's tensors renamed by the key map alone.

    The reference skips the converter's tensor checks, the files it writes and the pipeline
    that loads them: a tensor lost, swapped or altered on the way, or a diffusion setting
    that did not survive config.yaml, changes the samples.
    """
    config = tiny_mlmdm_config(2)
    tensors = synthetic_state_dict(config)
    torch.save(tensors, tmp_path / "w.pth")
    out = tmp_path / "out"
    cli(
        [
            "convert",
            "mlmdm",
            "--checkpoint",
            str(tmp_path / "w.pth"),
            "--config",
            str(write_yaml(tmp_path / "c.yaml", config)),
            "--out",
            str(out),
        ]
    )
    pipe = load_pipeline(out, device="cpu")
    sampling = torch.load(out / "state.pt", weights_only=True)["source"]["sampling"]
    assert (sampling["sampler"], sampling["eta"], sampling["guidance"]) == ("ddim", 0.0, 7.5)
    assert (sampling["clip_x0"], sampling["dynamic_threshold"]) == (True, None)  # threshold_function CLIP
    generator = torch.Generator().manual_seed(1)
    text, negative = torch.randn(2, 1, 4, TEXT_DIM, generator=generator)

    expected_config = run_config_from_mlmdm(config).config

    def reference_samples(weights: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        model = NestedUNet(expected_config.model).eval()
        model.load_state_dict({from_mlmdm_key(key): value for key, value in weights.items()})
        return _sample(model, build_process(expected_config), expected_config.sample.spacing, sampling, text, negative)

    expected = reference_samples(tensors)
    levels = _sample(pipe.model, pipe.process, pipe.config.sample.spacing, sampling, text, negative)
    assert [lv.shape[-1] for lv in levels] == [16, 8]
    for actual, wanted in zip(levels, expected, strict=True):
        # Not bit-identical: the pipeline runs channels_last, whose convolutions round differently,
        # and guidance 7.5 magnifies that to ~1e-5; the slip below is off by ~1e-2.
        torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-4)
        # Most values lie inside the clipping range, so agreeing is more than both saturating at +-1.
        assert (actual.abs() < 0.999).float().mean() > 0.4
    # The comparison catches a layout slip: k and v swapped in one inner cross-attention (kv_cond is k|v).
    victim = next(key for key in tensors if key.startswith("inner_unet.") and key.endswith("kv_cond.weight"))
    k, v = tensors[victim].chunk(2)
    for slipped, wanted in zip(reference_samples({**tensors, victim: torch.cat([v, k])}), expected, strict=True):
        with pytest.raises(AssertionError):
            torch.testing.assert_close(slipped, wanted, rtol=1e-4, atol=1e-4)


class _WordEncoder:
    """Stands in for FLAN-T5: one fixed random token per word, plus one for "</s>" (so "" has one token)."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def encode(self, prompts, device=None) -> TextEmbedding:
        self.prompts += list(prompts)
        rows = [[sum(map(ord, word)) for word in prompt.split()] + [0] for prompt in prompts]
        length = max(map(len, rows))
        tokens = torch.zeros(len(rows), length, TEXT_DIM)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, row in enumerate(rows):
            for j, seed in enumerate(row):
                tokens[i, j] = torch.randn(TEXT_DIM, generator=torch.Generator().manual_seed(seed))
                mask[i, j] = True
        return TextEmbedding(tokens, mask, tokens.sum(1))


def test_converted_dynamic_threshold_model_samples_as_mlmdm_without_flags(tmp_path):
    """sample.* carries ml-mdm's DDIM eta, DYNAMIC thresholding (s capped at 100) and guidance against ""."""
    config = _edit(tiny_mlmdm_config(1), "diffusion_config.sampler_config.threshold_function", "DYNAMIC")
    torch.save(synthetic_state_dict(config, seed=5), tmp_path / "w.pth")
    out = tmp_path / "out"
    cli(
        [
            "convert",
            "mlmdm",
            "--checkpoint",
            str(tmp_path / "w.pth"),
            "--config",
            str(write_yaml(tmp_path / "c.yaml", config)),
            "--out",
            str(out),
        ]
    )
    pipe = load_pipeline(out, device="cpu")
    sample = pipe.config.sample
    assert (
        sample.sampler,
        sample.eta,
        sample.threshold,
        sample.threshold_percentile,
        sample.threshold_max,
        sample.negative_prompt,
        sample.guidance,
    ) == ("ddim", 0.0, "dynamic", 0.995, 100.0, "", 7.5)
    assert pipe.config.text.mlmdm_compat == "sample"
    pipe.text_encoder = encoder = _WordEncoder()
    cond = pipe.condition(2, prompts=["a red chair"])
    levels = pipe.generate(cond=cond, steps=4, seed=3)
    assert encoder.prompts == ["a red chair"] * 2 + [""] * 2
    # The same as the sampler with ml-mdm's settings spelled out, from the same noise.
    generator = torch.Generator().manual_seed(3)
    noise = pipe.process.initial_noise(2, 3, pipe.resolution, generator=generator)
    negative = encoder.encode([""] * 2)
    expected = get_sampler("ddim")(
        pipe.model,
        noise,
        pipe.process,
        4,
        cond=cond,
        uncond=Conditioning(text=negative.tokens, text_mask=negative.mask),
        guidance=7.5,
        generator=generator,
        clip_x0=True,
        dynamic_threshold=0.995,
        dynamic_max=100.0,
        eta=0.0,
        spacing="mlmdm",
    )
    torch.testing.assert_close(levels[0], expected[0].clamp(-1, 1))
    # The thresholding matters here: clipping instead gives other images.
    clipped = pipe.generate(cond=cond, steps=4, seed=3, threshold="clip")
    assert (clipped[0] - levels[0]).abs().max() > 1e-2
