"""Stand-ins for ml-mdm's files in the conversion tests: small configs of the released
structure, random tensors under ml-mdm's names, and checkpoints pickled as ml-mdm saves them
(its argument dataclasses and enums under their old module names)."""

from __future__ import annotations

import argparse
import enum
import types
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from matryoshka.cli.convert import add_parser
from matryoshka.interop.mlmdm import (
    expected_shapes,
    from_mlmdm_key,
    run_config_from_mlmdm,
    to_mlmdm_key,
)
from matryoshka.pipeline import load_pipeline


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mdm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def sampler_config(shifted: bool, power: int | None = None) -> dict:
    """The released models' sampler_config: v-prediction, eps loss, DeepFloyd's squaredcos schedule."""
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
            "sampler_config": {**sampler_config(True, 2 if levels == 3 else 1), "threshold_function": "CLIP"},
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


class TrapModule(types.ModuleType):
    """A module whose every attribute access fails: proves that loading never resolves ml-mdm's classes."""

    def __getattr__(self, name):
        raise AssertionError(f"the converter looked up {self.__name__}.{name}")


def assert_converted(out: Path, tensors: dict[str, torch.Tensor], levels: int, step: int = 12345):
    pipe = load_pipeline(out, device="cpu")
    assert pipe.model.config.num_levels == levels and pipe.step == step
    assert pipe.train_seconds is None  # no training time of ours behind converted weights
    ours = pipe.model.state_dict()
    assert len(ours) == len(tensors)
    for key, value in tensors.items():
        assert torch.equal(ours[from_mlmdm_key(key)], value), key
    model_file = load_file(out / "model.safetensors")
    assert all(torch.equal(model_file[from_mlmdm_key(k)], v) for k, v in tensors.items())
    return pipe


def convert_with_cli(checkpoint: Path, config_file: Path, out: Path) -> int:
    """``mdm convert mlmdm --checkpoint ... --config ... --out ...``."""
    return cli(["convert", "mlmdm", "--checkpoint", str(checkpoint), "--config", str(config_file), "--out", str(out)])
