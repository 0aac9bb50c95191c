import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from matryoshka.interop.mlmdm import from_mlmdm_key, to_mlmdm_key
from matryoshka.models import Conditioning, LevelConfig, ModelConfig, NestedUNet, model_preset
from matryoshka.models.layers import Attention
from matryoshka.models.presets import tiny

# Names and shapes of the tensors in ml-mdm's released checkpoints (see its README.md).
REFERENCE = Path(__file__).resolve().parent / "data" / "mlmdm"


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give zero-initialised layers values too, so every path carries signal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model


def pyramid(config: ModelConfig, batch: int, top: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, side, side, generator=generator) for side in config.level_sides(top)]


@pytest.mark.parametrize(
    "preset, expected, reference",
    [
        ("mlmdm-64", 461_359_107, "cc12m_64x64_keys.txt"),
        ("mlmdm-256", 476_613_958, "cc12m_256x256_keys.txt"),
        ("mlmdm-1024", 480_970_057, "cc12m_1024x1024_keys.txt"),
    ],
)
def test_mlmdm_presets_match_released_architectures(preset, expected, reference):
    with torch.device("meta"):
        model = NestedUNet(model_preset(preset))
    assert sum(p.numel() for p in model.parameters()) == expected
    ours = {to_mlmdm_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {}
    for line in (REFERENCE / reference).read_text().splitlines():
        key, shape = line.split("\t")
        theirs[key] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    assert ours == theirs
    assert all(from_mlmdm_key(to_mlmdm_key(k)) == k for k in model.state_dict())


@pytest.mark.parametrize("num_levels", [2, 3])
def test_fresh_nesting_reproduces_inner_model(num_levels):
    config = tiny(num_levels)
    config.num_classes = 5
    config.text_dim = 12
    inner = randomize(NestedUNet(config.truncated(num_levels - 1)), seed=1)
    nested = NestedUNet(config)
    nested.inner_unet.load_state_dict(inner.state_dict())
    z = pyramid(config, 3, 32)
    t = torch.tensor([1.0, 500.0, 999.0])
    cond = Conditioning(
        labels=torch.tensor([0, 4, -1]),
        text=torch.randn(3, 6, 12),
        text_mask=torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [0] * 6]).bool(),
    )
    with torch.no_grad():
        expected = inner(z[1:], t, cond)
        got = nested(z, t, cond)
    assert len(got) == num_levels
    for a, b in zip(got[1:], expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradients_reach_every_parameter():
    config = tiny(3)
    config.num_classes = 3
    config.text_dim = 8
    config.text_proj_dim = 16
    config.levels[0].micro_conditioning = {"scale": 8}
    model = randomize(NestedUNet(config))
    z = pyramid(config, 2, 32)
    cond = Conditioning(labels=torch.tensor([1, 2]), text=torch.randn(2, 4, 8))
    loss = sum(out.square().mean() for out in model(z, torch.tensor([3.0, 700.0]), cond))
    loss.backward()
    silent = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert silent == []


def test_mixed_resolution_batch_matches_full_batch_for_computed_samples():
    config = tiny(2)
    model = randomize(NestedUNet(config)).eval()
    z = pyramid(config, 4, 16)
    t = torch.tensor([10.0, 200.0, 400.0, 900.0])
    with torch.no_grad():
        full = model(z, t)
        mixed = model([z[0][:2], z[1]], t)
    assert mixed[0].shape[0] == 2 and mixed[1].shape[0] == 4
    torch.testing.assert_close(mixed[0], full[0][:2])
    torch.testing.assert_close(mixed[1][:2], full[1][:2])
    # Samples without a top level get no adapter features, so their low level differs.
    assert not torch.allclose(mixed[1][2:], full[1][2:])


def reference_attention(layer: Attention, x, tokens=None, mask=None):
    """ml-mdm's attention written out with explicit einsums and the sqrt(sqrt(d)) scaling."""
    b, c, h, w = x.shape
    heads, d = layer.heads, c // layer.heads
    q, k, v = layer.qkv(layer.norm(x)).reshape(b, 3 * c, -1).chunk(3, dim=1)

    def attend(q, k, v, mask=None):
        scale = 1 / math.sqrt(math.sqrt(d))
        weight = torch.einsum(
            "bct,bcs->bts", (q * scale).reshape(b * heads, d, -1), (k * scale).reshape(b * heads, d, -1)
        )
        if mask is not None:
            weight = weight.masked_fill(~mask.repeat_interleave(heads, 0)[:, None, :], float("-inf"))
        weight = weight.softmax(-1)
        return torch.einsum("bts,bcs->bct", weight, v.reshape(b * heads, d, -1)).reshape(b, c, -1)

    out = attend(q, k, v)
    if tokens is not None:
        k_text, v_text = layer.kv_cond(layer.norm_cond(tokens)).transpose(1, 2).chunk(2, dim=1)
        out = out + attend(q, k_text, v_text, mask)
    x = x + layer.proj_out(out.reshape(b, c, h, w))
    return x + layer.ffn(x) if layer.ffn is not None else x


@pytest.mark.parametrize("with_text", [False, True])
def test_attention_matches_explicit_computation(with_text):
    torch.manual_seed(0)
    layer = randomize(Attention(32, heads=4, groups=8, cond_dim=10 if with_text else 0, ffn=True))
    x = torch.randn(2, 32, 4, 5)
    tokens = torch.randn(2, 7, 10) if with_text else None
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1] * 7]).bool() if with_text else None
    torch.testing.assert_close(
        layer(x, tokens, mask), reference_attention(layer, x, tokens, mask), rtol=1e-4, atol=1e-4
    )


def test_padding_tokens_do_not_change_output_and_null_text_is_finite():
    config = tiny(2)
    config.text_dim = 8
    model = randomize(NestedUNet(config)).eval()
    z = pyramid(config, 2, 16)
    t = torch.tensor([100.0, 600.0])
    text = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]).bool()
    other_padding = torch.where(mask[..., None], text, torch.randn_like(text) * 5)
    with torch.no_grad():
        a = model(z, t, Conditioning(text=text, text_mask=mask))
        b = model(z, t, Conditioning(text=other_padding, text_mask=mask))
        null = model(z, t, Conditioning(text=text, text_mask=mask).unconditional())
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    assert all(torch.isfinite(x).all() for x in null)
    assert not torch.allclose(null[0], a[0])


def test_class_labels_and_null_label():
    config = tiny(1)
    config.num_classes = 4
    model = randomize(NestedUNet(config)).eval()
    z = pyramid(config, 3, 8)
    t = torch.full((3,), 250.0)
    with torch.no_grad():
        out = model(z, t, Conditioning(labels=torch.tensor([0, 1, -1])))[0]
        none = model(z, t, None)[0]
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(out[2], none[2])  # missing labels mean the null class
    with pytest.raises(ValueError, match="out of range"):
        model(z, t, Conditioning(labels=torch.tensor([0, 1, 4])))


def test_micro_conditioning_scale_saturates_at_default():
    config = tiny(1)
    config.levels[0].micro_conditioning = {"scale": 8}
    model = randomize(NestedUNet(config)).eval()
    z, t = pyramid(config, 2, 8), torch.tensor([5.0, 5.0])
    with torch.no_grad():
        default = model(z, t)[0]
        large = model(z, t, Conditioning(micro={"scale": torch.tensor([64.0, 64.0])}))[0]
        small = model(z, t, Conditioning(micro={"scale": torch.tensor([2.0, 2.0])}))[0]
    torch.testing.assert_close(default, large)
    assert not torch.allclose(default, small)


@pytest.mark.parametrize("magnitude_preserving", [False, True])
def test_gradient_checkpointing_gives_same_gradients(magnitude_preserving):
    grads = []
    for checkpointing in (False, True):
        config = tiny(2)
        config.gradient_checkpointing = checkpointing
        config.magnitude_preserving = magnitude_preserving
        model = randomize(NestedUNet(config)).train()
        loss = sum(o.square().mean() for o in model(pyramid(config, 2, 16), torch.tensor([1.0, 2.0])))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_bf16_autocast_is_close_to_fp32():
    config = tiny(2)
    model = randomize(NestedUNet(config)).eval()
    z, t = pyramid(config, 2, 16), torch.tensor([100.0, 800.0])
    with torch.no_grad():
        reference = model(z, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(z, t)
    for a, b in zip(low, reference):
        assert torch.isfinite(a).all()
        assert (a.float() - b).abs().max() < 0.05 * b.abs().max() + 0.05


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="norm_groups"):
        LevelConfig(channels=[30], res_blocks=[1], norm_groups=32)
    with pytest.raises(ValueError, match="attention_stages"):
        LevelConfig(channels=[32, 64], res_blocks=[1], attention_stages=[2])
    with pytest.raises(ValueError, match="same factor"):
        ModelConfig(
            levels=[LevelConfig(), LevelConfig(channels=[32, 64], res_blocks=[1]), LevelConfig(channels=[32, 64, 64])]
        )
    model = NestedUNet(tiny(2))
    with pytest.raises(ValueError, match="2 levels"):
        model([torch.randn(1, 3, 16, 16)], torch.tensor([1.0]))


@pytest.mark.parametrize("magnitude_preserving", [False, True])
def test_patched_level_is_the_unpatched_network_on_pixel_patches(magnitude_preserving):
    """patch_size=2 is exactly a UNet with 4x the channels run on pixel_unshuffle(x), shuffled back."""
    level = LevelConfig(channels=[8, 16], res_blocks=[1], attention_stages=[1], norm_groups=4, attention_heads=4)
    patched = ModelConfig(levels=[replace(level, patch_size=2)], magnitude_preserving=magnitude_preserving)
    unpatched = ModelConfig(levels=[level], in_channels=12, out_channels=12, magnitude_preserving=magnitude_preserving)
    model = randomize(NestedUNet(patched)).eval()
    reference = NestedUNet(unpatched).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([40.0, 800.0])
    with torch.no_grad():
        got = model(x, t)[0]
        expected = F.pixel_shuffle(reference(F.pixel_unshuffle(x, 2), t)[0], 2)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_patched_outer_level_nests_at_its_bottleneck():
    config = tiny(2)
    config.levels[1] = LevelConfig(channels=[16], res_blocks=[2], norm_groups=4, mid_attention=False, patch_size=2)
    assert config.level_sides(32) == [32, 16]
    model = randomize(NestedUNet(config))
    z = pyramid(config, 2, 32)
    out = model(z, torch.tensor([5.0, 600.0]))
    assert [tuple(o.shape) for o in out] == [tuple(level.shape) for level in z]
    sum(o.square().mean() for o in out).backward()
    silent = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert silent == []


def test_only_the_outermost_level_may_be_patched():
    inner, outer = tiny(2).levels
    with pytest.raises(ValueError, match="only the outermost level"):
        ModelConfig(levels=[replace(inner, patch_size=2), outer])
    with pytest.raises(ValueError, match="patch_size must be >= 1"):
        replace(outer, patch_size=0)
