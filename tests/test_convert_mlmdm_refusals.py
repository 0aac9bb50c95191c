"""``mdm convert mlmdm`` refuses what it cannot convert faithfully: damaged or unsafe files
(nothing written, nothing executed) and ml-mdm options that change the computation."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from matryoshka.interop.mlmdm import (
    CheckpointFormatError,
    MlmdmConfigError,
    MlmdmError,
    MlmdmMismatchError,
    UnsafeCheckpointError,
    convert_mlmdm,
    read_mlmdm_yaml,
    read_weights,
    run_config_from_mlmdm,
)
from matryoshka.models import NestedUNet

from .config_edits import edit
from .mlmdm_fakes import (
    TEXT_DIM,
    assert_converted,
    cli,
    save_mlmdm_checkpoint,
    synthetic_state_dict,
    tiny_mlmdm_config,
    write_yaml,
)

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
        config = edit(config, "diffusion_config.sampler_config.schedule_type", "DDPM")
    with pytest.raises(MlmdmConfigError, match=message):
        run_config_from_mlmdm(edit(config, path, value))


def test_training_only_differences_need_consent():
    config = edit(tiny_mlmdm_config(2), "diffusion_config.use_vdm_loss_weights", True)
    with pytest.raises(MlmdmConfigError, match="--ignore-training-options"):
        run_config_from_mlmdm(config)
    conversion = run_config_from_mlmdm(config, strict_training=False)
    assert any("use_vdm_loss_weights" in note for note in conversion.notes)
    # mixed_ratio below the top level cannot be expressed; at the top it can.
    three = tiny_mlmdm_config(3)
    with pytest.raises(MlmdmConfigError, match="mixed_ratio"):
        run_config_from_mlmdm(edit(three, "diffusion_config.mixed_ratio", "1:1:1"))
    top_only = run_config_from_mlmdm(edit(three, "diffusion_config.mixed_ratio", "1:3:0"))
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
    config = edit(tiny_mlmdm_config(2), "unet_config.inner_config.resnet_config.num_groups_norm", 8)
    config = edit(config, "unet_config.resnet_config.num_groups_norm", 16)
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
    yaml_config = edit(config, "text_model", "google/flan-t5-base")
    yaml_config = edit(yaml_config, "unet_config.inner_config.conditioning_feature_dim", -1)
    result = convert_mlmdm(tmp_path / "vis_model.pth", write_yaml(tmp_path / "c.yaml", yaml_config), tmp_path / "out")
    assert result.config.model.text_dim == TEXT_DIM
    assert any(f"{TEXT_DIM}-wide text tokens" in note and "flan-t5-base" in note for note in result.notes)
    assert_converted(result.out, tensors, 2)
    # An encoder of the checkpoint's width saved in its arguments names text.encoder.
    assert result.config.text.encoder == "google/flan-t5-base"
    assert any("set text.encoder" in note for note in result.notes)
    one_level = edit(tiny_mlmdm_config(1), "text_model", "google/flan-t5-small")
    save_mlmdm_checkpoint(tmp_path / "small.pth", one_level, synthetic_state_dict(one_level))
    yaml_config = edit(one_level, "text_model", "google/flan-t5-base")
    yaml_file = write_yaml(tmp_path / "c1.yaml", yaml_config)
    result = convert_mlmdm(tmp_path / "small.pth", yaml_file, tmp_path / "out-small")
    assert (result.config.model.text_dim, result.config.text.encoder) == (512, "google/flan-t5-small")
    # --text-dim still wins, and a wrong one is refused by the tensor shapes.
    with pytest.raises(MlmdmMismatchError, match="wrong shape"):
        convert_mlmdm(tmp_path / "small.pth", tmp_path / "c1.yaml", tmp_path / "out-bad", text_dim=768)
