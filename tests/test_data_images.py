import random

import numpy as np
import pytest
import torch
from PIL import Image

from matryoshka.data import BadImage, load_image, to_rgb, verify_image
from matryoshka.data.images import decode_rgb, resize_crop_flip

from . import synthetic as syn


def rgb_pixel(im):
    out = to_rgb(im)
    assert out.mode == "RGB"
    return out.getpixel((0, 0))


def test_mode_conversions():
    assert rgb_pixel(syn.solid_image("RGB")) == (255, 0, 0)
    # fully transparent red -> white background, half transparent black -> mid grey
    assert rgb_pixel(syn.solid_image("RGBA")) == (255, 255, 255)
    r, g, b = rgb_pixel(syn.solid_image("RGBA", value=(0, 0, 0, 128)))
    assert r == g == b and 120 <= r <= 135
    assert rgb_pixel(syn.solid_image("LA")) == (255, 255, 255)
    assert rgb_pixel(syn.solid_image("L")) == (128, 128, 128)
    assert rgb_pixel(syn.solid_image("1")) == (255, 255, 255)
    assert rgb_pixel(syn.solid_image("CMYK")) == (255, 0, 0)
    assert rgb_pixel(syn.solid_image("I;16")) == (255, 255, 255)
    assert rgb_pixel(syn.solid_image("I;16", value=32896)) == (128, 128, 128)
    assert rgb_pixel(Image.fromarray(np.full((4, 4), 65535, dtype=np.int32), "I")) == (255, 255, 255)
    assert rgb_pixel(Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), "F")) == (128, 128, 128)
    assert rgb_pixel(syn.solid_image("P")) == (255, 0, 0)
    pal = syn.solid_image("P")
    pal.info["transparency"] = 1  # palette entry 1 transparent -> white
    assert rgb_pixel(pal) == (255, 255, 255)


@pytest.mark.parametrize(
    "mode, fmt, expected",
    [
        ("I;16", "PNG", (1.0, 1.0, 1.0)),
        ("CMYK", "JPEG", (1.0, -1.0, -1.0)),
        ("CMYK", "TIFF", (1.0, -1.0, -1.0)),
        ("L", "PNG", (128 / 127.5 - 1,) * 3),
        ("LA", "PNG", (1.0, 1.0, 1.0)),
        ("RGBA", "PNG", (1.0, 1.0, 1.0)),
        ("RGBA", "WEBP", (1.0, 1.0, 1.0)),
        ("P", "GIF", (1.0, -1.0, -1.0)),
    ],
)
def test_load_image_from_encoded_files(mode, fmt, expected):
    data = syn.encode(syn.solid_image(mode, (40, 30)), fmt)
    x = load_image(data, 16)
    assert x.dtype == torch.float32 and x.shape == (3, 16, 16)
    assert x.min() >= -1 and x.max() <= 1
    got = x.mean(dim=(1, 2))
    assert torch.allclose(got, torch.tensor(expected), atol=0.04), got


def test_resize_shortest_side_and_center_crop():
    im = syn.gradient_image((48, 32))
    x = load_image(syn.encode(im), 16, crop="center")
    ref = im.resize((24, 16), Image.LANCZOS).crop((4, 0, 20, 16))
    expected = torch.from_numpy(np.array(ref)).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(x, expected, atol=1e-6)
    # red increases left to right, green top to bottom
    assert (x[0, 8, 1:] >= x[0, 8, :-1]).all() and x[0, 8, -1] > x[0, 8, 0]
    assert (x[1, 1:, 8] >= x[1, :-1, 8]).all() and x[1, -1, 8] > x[1, 0, 8]


def test_small_images_are_upscaled():
    x = load_image(syn.encode(syn.gradient_image((10, 6))), 32)
    assert x.shape == (3, 32, 32)


def test_random_crop_and_flip_are_seeded():
    im = syn.gradient_image((64, 16)).convert("RGB")
    crops = {tuple(np.asarray(resize_crop_flip(im, 16, "random", False, random.Random(s)))[0, :, 0]) for s in range(20)}
    assert len(crops) > 3  # different offsets happen
    a = load_image(syn.encode(im), 16, "random", True, random.Random(7))
    b = load_image(syn.encode(im), 16, "random", True, random.Random(7))
    assert torch.equal(a, b)
    flips = [
        load_image(syn.encode(syn.gradient_image((16, 16))), 16, "center", True, random.Random(s)) for s in range(16)
    ]
    left_to_right = [bool(f[0, 0, -1] > f[0, 0, 0]) for f in flips]
    assert any(left_to_right) and not all(left_to_right)


def test_bad_inputs_have_reasons(tmp_path):
    cases = {
        "zero_bytes": b"",
        "not_an_image": syn.corrupt_bytes(),
        "truncated": syn.truncated_png(),
    }
    for reason, data in cases.items():
        path = syn.write(tmp_path / f"{reason}.png", data)
        for fn in (lambda p: verify_image(p), lambda p: load_image(p, 16)):
            with pytest.raises(BadImage) as info:
                fn(path)
            assert info.value.reason == reason
    with pytest.raises(BadImage) as info:
        load_image(str(tmp_path / "missing.png"), 16)
    assert info.value.reason == "missing_file"


def test_truncated_jpeg_passes_verify_but_fails_load():
    data = syn.encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    data = data[: len(data) // 2]
    verify_image(data)  # JPEG verify does not decode
    with pytest.raises(BadImage) as info:
        load_image(data, 16)
    assert info.value.reason == "truncated"


def test_decompression_bomb(monkeypatch):
    data = syn.encode(syn.solid_image("RGB", (50, 50)))
    with pytest.raises(BadImage) as info:
        load_image(data, 16, max_pixels=1000)
    assert info.value.reason == "decompression_bomb"
    # Pillow's own warning/error is treated the same way
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadImage) as info:
        verify_image(data, max_pixels=10**9)
    assert info.value.reason == "decompression_bomb"


def test_exif_orientation_is_applied():
    im = syn.gradient_image((40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = __import__("io").BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    out = decode_rgb(buf.getvalue())
    assert out.size == (20, 40)
