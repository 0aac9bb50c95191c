"""``mdm convert mlmdm``: converted weights compute what ml-mdm's layouts compute (by hand), and
converted checkpoints sample as ml-mdm's settings say."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from matryoshka.diffusion.samplers import get_sampler
from matryoshka.interop.mlmdm import (
    convert_state_dict,
    from_mlmdm_key,
    run_config_from_mlmdm,
)
from matryoshka.models import Conditioning, NestedUNet
from matryoshka.pipeline import build_process, load_pipeline
from matryoshka.text.base import TextEmbedding

from .config_edits import edit
from .mlmdm_fakes import (
    TEXT_DIM,
    convert_with_cli,
    synthetic_state_dict,
    tiny_mlmdm_config,
    write_yaml,
)

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
    convert_with_cli(tmp_path / "w.pth", write_yaml(tmp_path / "c.yaml", config), out)
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
    config = edit(tiny_mlmdm_config(1), "diffusion_config.sampler_config.threshold_function", "DYNAMIC")
    torch.save(synthetic_state_dict(config, seed=5), tmp_path / "w.pth")
    out = tmp_path / "out"
    convert_with_cli(tmp_path / "w.pth", write_yaml(tmp_path / "c.yaml", config), out)
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
