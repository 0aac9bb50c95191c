"""`mdm convert diffusers-mdm`: the diffusers community port's Matryoshka UNet into our checkpoint.

The port's real module tree is checked through the key lists in tests/data/diffusers_mdm
(recorded from its classes); conversions run on small synthetic checkpoints in its
layout, whose tensors come from one of our models renamed by rules written here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from matryoshka.cli.convert import add_parser
from matryoshka.interop.diffusers_mdm import (
    DiffusersMdmError,
    convert_diffusers_mdm,
    diffusers_key,
    model_from_diffusers,
)
from matryoshka.interop.mlmdm import MlmdmMismatchError, UnsafeCheckpointError, expected_shapes
from matryoshka.models import Conditioning, NestedUNet
from matryoshka.pipeline import load_pipeline

from .config_edits import edit

DATA = Path(__file__).resolve().parent / "data" / "diffusers_mdm"
TEXT, CROSS = 24, 32


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mdm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_every_tensor_of_the_port_lands_on_a_model_tensor_of_the_same_shape(levels):
    data = json.loads((DATA / f"port_{levels}_levels.json").read_text())
    notes: list[str] = []
    model, flips = model_from_diffusers(data["config"], notes)
    assert model.num_levels == levels and flips == [True] + [False] * (levels - 1)
    assert (model.text_dim, model.text_proj_dim, model.embed_dim) == (48, 64, 1024)
    expected = expected_shapes(model)
    mapped = {}
    for key, shape in data["shapes"].items():
        ours = diffusers_key(key, model)
        assert ours in expected, key
        linear_as_conv = len(shape) == 2 and len(expected[ours]) == 4
        assert tuple([*shape, 1, 1] if linear_as_conv else shape) == expected[ours], key
        mapped[ours] = key
    assert set(mapped) == set(expected) and len(mapped) == len(data["shapes"])
    groups = [level.attention_groups for level in model.levels]
    assert groups == [32] * levels and model.levels[0].norm_groups == (16 if levels == 1 else 32)


# ---------------------------------------------------------------------------- small checkpoints in the port's layout


def port_config(levels: int) -> dict:
    """A port config.json: innermost [32, 64] (attention at stage 1), outer levels [32, 32], width 128 or 512."""
    inner = {
        "block_out_channels": [32, 64] if levels == 1 else [128, 128],
        "layers_per_block": [1, 2],
        "transformer_layers_per_block": [0, 2],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "attention_head_dim": 8,
        "cross_attention_dim": CROSS,
        "encoder_hid_dim": TEXT,
        "resnet_time_scale_shift": "scale_shift",
        "addition_embed_type": "matryoshka",
        "micro_conditioning_scale": 64,
        "masked_cross_attention": False,
        "nesting": levels > 1,
        "use_attention_ffn": True,
        "norm_num_groups": 16,
    }
    if levels == 1:
        return {**inner, "_class_name": "MatryoshkaUNet2DConditionModel", "flip_sin_to_cos": True}
    return {
        "_class_name": "NestedUNet2DConditionModel",
        "block_out_channels": [32, 32],
        "layers_per_block": [1, 1],
        "transformer_layers_per_block": [0, 0],
        "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"],
        "mid_block_type": None,
        "cross_attention_dim": CROSS,
        "resnet_time_scale_shift": "scale_shift",
        "addition_embed_type": "matryoshka",
        "flip_sin_to_cos": False,
        "micro_conditioning_scale": 256,
        "time_embedding_dim": 512,
        "skip_normalization": False,
        "nesting": False,
        "norm_num_groups": 8,
        "use_attention_ffn": False,
        "inner_config": inner,
    }


_RESNET = {"time_layer": "time_emb_proj", "conv3": "conv_shortcut"}
_ATTENTION = {
    "norm": "attn1.group_norm",
    "qkv": "attn1.to_qkv",
    "norm_cond": "attn2.norm_cross",
    "kv_cond": "attn2.to_kv",
    "proj_out": "proj_out",
    "ffn.0": "ff.group_norm",
    "ffn.1": "ff.linear_gelu.proj",
    "ffn.3": "ff.linear_out",
}
_TOP = {
    "temb.layer1": "time_embedding.linear_1",
    "temb.layer2": "time_embedding.linear_2",
    "cond_layers.scale.layer1": "add_embedding.add_timestep_embedder.linear_1",
    "cond_layers.scale.layer2": "add_embedding.add_timestep_embedder.linear_2",
    "cond_emb": "add_embedding.cond_emb",
    "lm_proj": "encoder_hid_proj",
    "norm_out": "conv_norm_out",
}


def to_port(name: str, value: torch.Tensor, model, flips: list[bool]) -> tuple[str, torch.Tensor]:
    """One of our tensors under the port's name and shape (the port's module tree, spelled out)."""
    prefix = re.match(r"(inner_unet\.)*", name).group(0)
    depth = prefix.count("inner_unet.")
    level = model.levels[model.num_levels - 1 - depth]
    rest, (layer, leaf) = name[len(prefix) :], name[len(prefix) :].rsplit(".", 1)
    if layer in _TOP:
        if layer == "temb.layer1" and leaf == "weight" and flips[model.num_levels - 1 - depth]:
            sin, cos = value.chunk(2, dim=1)
            value = torch.cat([cos, sin], dim=1)
        return prefix + _TOP[layer] + "." + leaf, value
    mid = re.fullmatch(r"mid_blocks\.(\d)\.(resnets\.0|attn\.0)\.(.+)", layer)
    if mid:
        block, part, sub = mid.groups()
        if part == "attn.0":
            return f"{prefix}mid_block.attentions.0.transformer_blocks.0.{_ATTENTION[sub]}.{leaf}", value.squeeze()
        return f"{prefix}mid_block.resnets.{block}.{_RESNET.get(sub, sub)}.{leaf}", value
    block = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets\.\d+|attn\.\d+|resample)(?:\.(.+))?", layer)
    if block:
        side, index, part, sub = block.groups()
        where = f"{prefix}{side}_blocks.{index}."
        if part == "resample":
            return f"{where}{'downsamplers' if side == 'down' else 'upsamplers'}.0.conv.{leaf}", value
        if part.startswith("resnets"):
            return f"{where}{part}.{_RESNET.get(sub, sub)}.{leaf}", value
        stage = int(index) if side == "down" else len(level.channels) - 1 - int(index)
        per_resnet = level.stage_attention_layers(stage)
        n = int(part.split(".")[1])
        linear = value.squeeze(-1).squeeze(-1) if value.dim() == 4 else value
        block_name = f"attentions.{n // per_resnet}.transformer_blocks.{n % per_resnet}"
        return f"{where}{block_name}.{_ATTENTION[sub]}.{leaf}", linear
    return prefix + rest, value  # conv_in, conv_out, in_adapter, out_adapter


def save_port(folder: Path, levels: int, seed: int = 0, weights: str = "safetensors") -> tuple[NestedUNet, dict]:
    """A port checkpoint folder (config.json + weights) and our model that holds the same tensors."""
    config = port_config(levels)
    model_config, flips = model_from_diffusers(config, [])
    torch.manual_seed(seed)
    ours = NestedUNet(model_config).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.1)
    state = dict(to_port(k, v.clone(), model_config, flips) for k, v in ours.state_dict().items())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if weights == "safetensors":
        save_file(state, folder / "diffusion_pytorch_model.safetensors")
    else:
        torch.save(state, folder / "diffusion_pytorch_model.bin")
    return ours, state


@pytest.mark.parametrize("levels, weights", [(1, "safetensors"), (2, "bin")])
def test_conversion_through_the_cli_gives_back_the_model(levels, weights, tmp_path, capsys):
    ours, _ = save_port(tmp_path / "nesting_level", levels, weights=weights)
    out = tmp_path / "converted"
    assert cli(["convert", "diffusers-mdm", "--model", str(tmp_path / "nesting_level"), "--out", str(out)]) == 0
    assert "converted" in capsys.readouterr().out
    pipe = load_pipeline(out, device="cpu")
    for name, value in ours.state_dict().items():
        assert torch.equal(pipe.model.state_dict()[name], value), name
    config = pipe.config
    assert config.data.resolution == 64 * 2 ** (levels - 1)
    assert (config.sample.sampler, config.sample.spacing, config.sample.negative_prompt) == ("ddim", "mlmdm", "")
    assert (config.diffusion.schedule, config.diffusion.prediction) == ("squaredcos", "v")
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["source"]["format"] == "diffusers-mdm" and state["num_levels"] == levels
    if levels == 2:
        # The port's NestedUNet builds its layers with 32 groups whatever its config.json says.
        assert config.model.levels[1].norm_groups == 32
        assert any("norm_num_groups" in note for note in state["source"]["notes"])
    assert config.model.levels[0].norm_groups == 16 and config.model.levels[0].attention_groups == 32


def test_the_port_layouts_by_hand(tmp_path):
    """to_qkv is q|k|v (Linear), to_kv is k|v, the time sinusoid is [cos, sin], heads own contiguous channels."""
    ours, state = save_port(tmp_path / "port", 1, seed=3)
    convert_diffusers_mdm(tmp_path / "port", tmp_path / "out")
    pipe_model = load_pipeline(tmp_path / "out", device="cpu").model
    # Time embedding as the port computes it: Timesteps(32, flip_sin_to_cos=True), then linear_1 -> SiLU -> linear_2.
    t = torch.tensor([3.0, 500.0])
    freqs = torch.exp(-math.log(10000.0) * torch.arange(16, dtype=torch.float32) / 16)
    angles = t[:, None] * freqs[None]
    features = torch.cat([angles.cos(), angles.sin()], dim=1)
    w1, b1 = state["time_embedding.linear_1.weight"], state["time_embedding.linear_1.bias"]
    w2, b2 = state["time_embedding.linear_2.weight"], state["time_embedding.linear_2.bias"]
    expected = F.linear(F.silu(F.linear(features, w1, b1)), w2, b2)
    with torch.no_grad():
        torch.testing.assert_close(pipe_model.temb(t), expected, rtol=1e-5, atol=1e-5)
    # The second transformer block after the first ResNet of up block 0 (stage 1), in the port's terms.
    p = {
        k.removeprefix("up_blocks.0.attentions.0.transformer_blocks.1."): v
        for k, v in state.items()
        if k.startswith("up_blocks.0.attentions.0.transformer_blocks.1.")
    }
    x, tokens = torch.randn(2, 64, 4, 4), torch.randn(2, 5, CROSS)
    heads, width = 8, 8
    h = F.group_norm(x, 32, p["attn1.group_norm.weight"], p["attn1.group_norm.bias"]).flatten(2).transpose(1, 2)
    q, k, v = F.linear(h, p["attn1.to_qkv.weight"], p["attn1.to_qkv.bias"]).chunk(3, dim=-1)
    text = F.layer_norm(tokens, (CROSS,), p["attn2.norm_cross.weight"], p["attn2.norm_cross.bias"])
    k_text, v_text = F.linear(text, p["attn2.to_kv.weight"], p["attn2.to_kv.bias"]).chunk(2, dim=-1)

    def split(a):
        return a.reshape(a.shape[0], a.shape[1], heads, width).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    out = out + F.scaled_dot_product_attention(split(q), split(k_text), split(v_text))
    out = F.linear(out.transpose(1, 2).reshape(2, 16, 64), p["proj_out.weight"], p["proj_out.bias"])
    y = x + out.transpose(1, 2).reshape(x.shape)
    f = F.group_norm(y, 32, p["ff.group_norm.weight"], p["ff.group_norm.bias"]).flatten(2).transpose(1, 2)
    f = F.linear(
        F.gelu(F.linear(f, p["ff.linear_gelu.proj.weight"], p["ff.linear_gelu.proj.bias"])),
        p["ff.linear_out.weight"],
        p["ff.linear_out.bias"],
    )
    expected = y + f.transpose(1, 2).reshape(x.shape)
    with torch.no_grad():
        torch.testing.assert_close(pipe_model.up_blocks[0].attn[1](x, tokens), expected, rtol=1e-4, atol=1e-5)
    # And the whole converted model is our model with the same tensors.
    z, cond = [torch.randn(1, 3, 64, 64)], Conditioning(text=torch.randn(1, 4, TEXT))
    with torch.no_grad():
        torch.testing.assert_close(pipe_model(z, torch.tensor([10.0]), cond), ours(z, torch.tensor([10.0]), cond))


# ---------------------------------------------------------------------------- refusals: precise, nothing written


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("inner_config.resnet_time_scale_shift", "default", "resnet_time_scale_shift"),
        ("inner_config.micro_conditioning_scale", None, "drops the pooled text embedding"),
        ("inner_config.use_attention_ffn", False, "feed-forward layer regardless"),
        ("inner_config.mid_block_type", None, "UNetMidBlock2DCrossAttn"),
        ("inner_config.freq_shift", 1, "freq_shift"),
        ("inner_config.up_block_types", ["UpBlock2D", "CrossAttnUpBlock2D"], "do not mirror"),
        ("micro_conditioning_scale", 512, "256 or 1024"),
        ("time_embedding_dim", 256, "time embedding widths"),
        ("temporal_mode", True, "temporal_mode"),
    ],
)
def test_options_the_port_computes_otherwise_are_refused(path, value, message, tmp_path):
    with pytest.raises(DiffusersMdmError, match=message):
        model_from_diffusers(edit(port_config(2), path, value), [])


def test_mismatched_tensors_are_listed_by_name_and_nothing_is_written(tmp_path):
    _, state = save_port(tmp_path / "port", 1)
    del state["conv_in.weight"]
    state["down_blocks.0.extra.weight"] = torch.zeros(1)
    state["conv_out.bias"] = torch.zeros(4)
    save_file(state, tmp_path / "port" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(MlmdmMismatchError) as error:
        convert_diffusers_mdm(tmp_path / "port", tmp_path / "out")
    text = str(error.value)
    assert "conv_in.weight" in text and "down_blocks.0.extra.weight" in text and "conv_out.bias: (4,)" in text
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".converting-" in p.name]


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_bin_whose_pickle_runs_code_is_refused_and_nothing_runs(tmp_path):
    folder = tmp_path / "port"
    save_port(folder, 1, weights="bin")
    marker = tmp_path / "pwned"
    torch.save({"conv_in.weight": torch.zeros(1), "x": _Payload(marker)}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="Nothing from the file was executed"):
        convert_diffusers_mdm(folder, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_missing_files_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        convert_diffusers_mdm(tmp_path / "empty", tmp_path / "out")
    save_file({"a": torch.zeros(1)}, tmp_path / "empty" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        convert_diffusers_mdm(tmp_path / "empty", tmp_path / "out")
