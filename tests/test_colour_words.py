"""Colour words of images (data.colour_captions and benchmarks/prompt_colours.py)."""

import numpy as np
import pytest

from matryoshka.data import DataConfig, EmojiDataset
from matryoshka.data.colour_words import BACKGROUND, COLOUR_WORDS, colour_caption, main_colours, pixel_colours
from matryoshka.data.config import DataConfigError

from .test_data_emoji import cache_dir  # noqa: F401  (the shared emoji cache fixture)

PURE = {
    (230, 30, 30): "red",
    (250, 140, 20): "orange",
    (250, 220, 40): "yellow",
    (40, 180, 60): "green",
    (30, 90, 230): "blue",
    (140, 40, 200): "purple",
    (240, 90, 180): "pink",
    (140, 80, 40): "brown",
    (150, 0, 30): "red",  # dark crimson: hue 348, past the pink band, is red, not brown
    (150, 10, 0): "red",
    (128, 128, 128): "grey",
    (20, 20, 20): "black",
}


def test_every_pixel_gets_the_word_of_its_hue_value_and_saturation():
    rgb = np.array([list(PURE) + [(255, 255, 255), (250, 250, 248)]], dtype=np.uint8)
    words = [COLOUR_WORDS[i] if i != BACKGROUND else "background" for i in pixel_colours(rgb)[0]]
    assert words == list(PURE.values()) + ["background", "background"]


def image(*parts: tuple[tuple[int, int, int], int]) -> np.ndarray:
    """A 10x10 white image whose first pixels have the given colours, in the given counts."""
    pixels = np.full((100, 3), 255, dtype=np.uint8)
    start = 0
    for colour, count in parts:
        pixels[start : start + count] = colour
        start += count
    return pixels.reshape(10, 10, 3)


def test_main_colours_are_those_covering_a_share_of_the_foreground_most_common_first():
    red, blue, green = (230, 30, 30), (30, 90, 230), (40, 180, 60)
    # 60 red, 30 blue, 10 green of 100 foreground pixels; the white rest does not count.
    assert main_colours(image((red, 30), (blue, 15), (green, 5))) == ["red", "blue"]
    assert main_colours(image((red, 30), (blue, 15), (green, 5)), share=0.05, most=3) == ["red", "blue", "green"]
    assert main_colours(image((blue, 10), (red, 40))) == ["red"]  # blue is 20% < 25%
    assert main_colours(image()) == []
    assert colour_caption("red heart", image((red, 40))) == "red heart, red"
    assert colour_caption("white flag", image()) == "white flag"
    with pytest.raises(ValueError, match="share"):
        main_colours(image(), share=0)


def test_colour_captions_name_each_emojis_colours(cache_dir):  # noqa: F811
    named = EmojiDataset(DataConfig(cache_dir=cache_dir, captions=True, colour_captions=True))
    captions = {named.name(i): named[i]["caption"] for i in range(len(named))}
    for name, colour in [
        ("red heart", "red"),
        ("green heart", "green"),
        ("blue heart", "blue"),
        ("pile of poo", "brown"),
    ]:
        assert captions[name] == f"{name}, {colour}"
    assert captions["grinning face"].startswith("grinning face, yellow")
    with_colour = sum(caption.count(",") > name.count(",") for name, caption in captions.items())
    assert with_colour > 0.95 * len(captions)
    with pytest.raises(DataConfigError, match="colour_captions"):
        DataConfig(colour_captions=True)  # without captions
    with pytest.raises(DataConfigError, match="colour_captions"):
        DataConfig(source="imagefolder", path="x", captions=True, colour_captions=True)
