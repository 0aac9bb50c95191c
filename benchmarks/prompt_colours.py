"""Does a text-to-image run draw the colour its prompt names? Colour accuracy per guidance scale.

    python benchmarks/prompt_colours.py runs/emoji64-text --guidance 1 4 --num 16

For each prompt ("red heart", "green apple", ...) it samples ``--num`` images and counts those
whose most common chromatic colour (``matryoshka.data.colour_words`` names every pixel; white
background, grey and black are not counted, so a greyish background cannot win) is the
prompt's colour word. Guidance 1 (no guidance) shows what the model draws whatever the prompt.
Prints the accuracies, writes them as JSON to ``--out`` and the first eight samples of every
prompt as one grid per guidance scale next to it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from matryoshka.data.colour_words import COLOUR_WORDS, pixel_colours
from matryoshka.pipeline import load_pipeline

PROMPTS = [
    "red heart",
    "orange heart",
    "yellow heart",
    "green heart",
    "blue heart",
    "purple heart",
    "brown heart",
    "red apple",
    "green apple",
    "blue circle",
]


CHROMATIC = [COLOUR_WORDS.index(word) for word in COLOUR_WORDS if word not in ("grey", "black")]


def drawn_colour(image: np.ndarray) -> str | None:
    """The most common chromatic colour word of an image's pixels (None if it has none)."""
    counts = np.bincount(pixel_colours(image).ravel() + 1, minlength=len(COLOUR_WORDS) + 1)[1:]
    if not counts[CHROMATIC].any():
        return None
    return COLOUR_WORDS[max(CHROMATIC, key=lambda i: counts[i])]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] to (N, H, W, 3) uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a text-to-image run or checkpoint directory")
    parser.add_argument("--prompts", nargs="+", default=PROMPTS, help="each must start with a colour word")
    parser.add_argument("--guidance", nargs="+", type=float, default=[1.0, 4.0])
    parser.add_argument("--num", type=int, default=16, help="samples per prompt")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("prompt_colours.json"))
    args = parser.parse_args()
    wanted = [prompt.split()[0] for prompt in args.prompts]
    allowed = [COLOUR_WORDS[i] for i in CHROMATIC]
    unknown = sorted({word for word in wanted if word not in allowed})
    if unknown:
        raise SystemExit(f"prompts must start with one of {', '.join(allowed)}; not {', '.join(unknown)}")

    pipe = load_pipeline(args.run)
    rows = []
    for guidance in args.guidance:
        hits, grid = {}, []
        for prompt, colour in zip(args.prompts, wanted):
            cond = pipe.condition(args.num, prompts=[prompt])
            images = to_uint8(pipe.generate(cond=cond, guidance=guidance, steps=args.steps, seed=args.seed)[0])
            drawn = [drawn_colour(image) for image in images]
            hits[prompt] = sum(word == colour for word in drawn) / len(drawn)
            grid.append(np.concatenate(list(images[:8]), axis=1))
        accuracy = float(np.mean(list(hits.values())))
        rows.append({"guidance": guidance, "accuracy": accuracy, "per_prompt": hits, "step": pipe.step})
        grid_path = args.out.with_name(f"{args.out.stem}_g{guidance:g}.png")
        Image.fromarray(np.concatenate(grid, axis=0)).save(grid_path)
        print(f"guidance {guidance:g}: colour accuracy {accuracy:.1%} (grid: {grid_path})")
        print("  " + ", ".join(f"{prompt} {share:.0%}" for prompt, share in hits.items()))
    args.out.write_text(json.dumps({"run": str(args.run), "num": args.num, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
