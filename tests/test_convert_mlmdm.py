"""``mdm convert mlmdm``: ml-mdm configs and checkpoints into our format.

The released models are ~460M parameters each, so for them only the config mapping and
the name/shape mapping (against the reference key lists) are checked, without tensors.
Round trips with real tensors use small configs of the same structure. The ml-mdm
configs below are written here from the released values; they are not Apple's files.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from matryoshka.interop.mlmdm import (
    MlmdmConfigError,
    MlmdmMismatchError,
    convert_mlmdm,
    expected_shapes,
    from_mlmdm_key,
    map_mlmdm_keys,
    read_mlmdm_yaml,
    run_config_from_mlmdm,
)
from matryoshka.models import Conditioning, model_preset

from .mlmdm_fakes import (
    TEXT_DIM,
    assert_converted,
    cli,
    sampler_config,
    synthetic_state_dict,
    tiny_mlmdm_config,
    write_yaml,
)

# Names and shapes of the tensors in ml-mdm's released checkpoints (see its README.md).
REFERENCE = Path(__file__).resolve().parent / "data" / "mlmdm"


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
                "sampler_config": {**sampler_config(False), "threshold_function": "CLIP", "rescale_schedule": 1.0},
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
                "sampler_config": {**sampler_config(True), "rescale_signal": 1},
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
            "sampler_config": {**sampler_config(True, 2), "rescale_signal": 1},
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
