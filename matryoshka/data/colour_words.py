"""The basic colour words of an image on a white background: for captions, and to check samples.

Emoji names rarely say their colours (one "green heart" among 3,656 emoji), so a text model
sees the word "green" a few times in an epoch. Naming every emoji's main colours in its
caption (``data.colour_captions``) is synthetic recaptioning (Betker et al. 2023, DALL-E 3):
each colour word then comes with thousands of images. The same naming measures whether
samples follow a prompt's colour word (``benchmarks/prompt_colours.py``).
"""

from __future__ import annotations

import numpy as np

COLOUR_WORDS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "grey", "black")
HUE_BANDS = ((18, "red"), (40, "orange"), (70, "yellow"), (170, "green"), (260, "blue"), (300, "purple"), (340, "pink"))
"""Upper hue bound in degrees of each chromatic word; hues from 340 wrap round to red."""
BACKGROUND = -1


def pixel_colours(rgb: np.ndarray) -> np.ndarray:
    """Index into COLOUR_WORDS of every pixel of uint8 RGB (..., 3); BACKGROUND for near-white ones."""
    x = rgb.astype(np.float32) / 255.0
    value = x.max(-1)
    spread = value - x.min(-1)
    saturation = np.where(value > 0, spread / np.maximum(value, 1e-6), 0.0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    safe = np.maximum(spread, 1e-6)
    hue = (
        np.select(
            [value == r, value == g],
            [((g - b) / safe) % 6.0, (b - r) / safe + 2.0],
            (r - g) / safe + 4.0,
        )
        * 60.0
    )
    bounds = np.array([bound for bound, _ in HUE_BANDS], dtype=np.float32)
    band = np.searchsorted(bounds, hue, side="right")
    words = np.array([COLOUR_WORDS.index(word) for _, word in HUE_BANDS] + [COLOUR_WORDS.index("red")])
    index = words[band]
    warm = (index == COLOUR_WORDS.index("orange")) | (index == COLOUR_WORDS.index("red"))
    # Dark orange and orange-red are brown; dark crimson (hue wrapping round from 340) stays red.
    brownish = (hue >= 10) & (hue < HUE_BANDS[-1][0])
    index = np.where(warm & brownish & (value < 0.75), COLOUR_WORDS.index("brown"), index)
    index = np.where(saturation < 0.2, COLOUR_WORDS.index("grey"), index)
    index = np.where(value < 0.3, COLOUR_WORDS.index("black"), index)
    return np.where((value > 0.9) & (saturation < 0.12), BACKGROUND, index)


def main_colours(rgb: np.ndarray, share: float = 0.25, most: int = 2) -> list[str]:
    """Colour words covering at least ``share`` of the non-background pixels, most common first."""
    if not 0 < share <= 1 or most < 1:
        raise ValueError(f"need 0 < share <= 1 and most >= 1, got share={share}, most={most}")
    index = pixel_colours(rgb).ravel()
    index = index[index != BACKGROUND]
    if index.size == 0:
        return []
    counts = np.bincount(index, minlength=len(COLOUR_WORDS)) / index.size
    order = [i for i in np.argsort(-counts, kind="stable") if counts[i] >= share]
    return [COLOUR_WORDS[i] for i in order[:most]]


def colour_caption(name: str, rgb: np.ndarray) -> str:
    """``name`` followed by the image's main colours: "red heart, red"."""
    colours = main_colours(rgb)
    return ", ".join([name, *colours]) if colours else name
