"""Does the motion follow the prompt? The motion-direction benchmark of a text-to-video run.

    python benchmarks/motion_direction.py --run runs/emoji-video-text --num 64 --steps 25
    python benchmarks/motion_direction.py --run runs/emoji-video-text --num 16 --sprite "red heart" --out motion.json

Samples ``--num`` clips for the prompts "<sprite> moving left/right/up/down" (each sprite once in
every direction; sprites spread evenly over the emoji-motion sprites the run trained on, whose
captions name them, or given by ``--sprite``), tracks the sprite's centroid frame to frame at every level
(``matryoshka/evaluation/motion.py``: the pixels unlike the background colour, which is estimated
from the clip's border), and reports, as JSON, the fraction of clips whose net motion is in the
prompted direction, per direction and overall. Chance is 0.25 for a model whose sprites move in a
random direction; clips without a detectable motion count as wrong.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from matryoshka.data import DataConfig
from matryoshka.data.emoji_motion import EmojiMotionDataset
from matryoshka.diffusion.spacetime import level_name
from matryoshka.evaluation.motion import DIRECTIONS, direction_scores, track
from matryoshka.pipeline import Pipeline, load_pipeline


def emoji_sprites(count: int, data: DataConfig) -> list[str]:
    """``count`` emoji names spread evenly over the run's emoji-motion sprites (the names its captions use)."""
    sprites = data.sprites if data.source == "emoji-motion" else 0
    dataset = EmojiMotionDataset(
        DataConfig(source="emoji-motion", resolution=data.resolution, frames=2, captions=True, sprites=sprites)
    )
    names = [dataset.table.names[row] for row in dataset.rows]
    return [names[i] for i in np.linspace(0, len(names) - 1, count).astype(int)]


def prompts_for(sprites: list[str], num: int) -> list[tuple[str, str]]:
    """(prompt, direction) for ``num`` clips: every sprite in the four directions, sprites in turn."""
    pairs = [(f"{sprite} moving {direction}", direction) for sprite in sprites for direction in DIRECTIONS]
    return [pairs[i % len(pairs)] for i in range(num)]


def check_run(pipeline: Pipeline) -> None:
    if not pipeline.model.config.is_video:
        raise SystemExit("--run is an image run: the motion benchmark needs a video run (model.frames)")
    if not pipeline.model.config.text_dim:
        raise SystemExit("--run has no text conditioning: the benchmark prompts directions (e.g. emoji-video-text)")


def sample_and_track(pipeline: Pipeline, prompts: list[str], args) -> dict[str, list]:
    """Per level name: the tracks of the clips made for ``prompts``, in batches."""
    tracks: dict[str, list] = {}
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        levels = pipeline.generate(
            num=len(batch),
            cond=pipeline.condition(len(batch), prompts=batch),
            sampler=args.sampler,
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed + start,
        )
        for level in levels:
            tracks.setdefault(level_name(level), []).extend(track(clip) for clip in level)
    return tracks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a text-to-video run directory or checkpoint")
    parser.add_argument("--num", type=int, default=64, help="clips (a multiple of 4: each sprite in every direction)")
    parser.add_argument("--steps", type=int, default=25, help="sampler steps")
    parser.add_argument("--sampler", default=None, help="ddpm, ddim or dpm++2m (default: the run's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the run's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sprite", action="append", default=[], help="a sprite name (repeatable; default: emoji)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.num < 4 or args.num % 4:
        parser.error(f"--num must be a positive multiple of 4 (each sprite in every direction), got {args.num}")
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1")

    pipeline = load_pipeline(args.run)
    check_run(pipeline)
    sprites = args.sprite or emoji_sprites(args.num // 4, pipeline.config.data)
    prompts, wanted = zip(*prompts_for(sprites, args.num))
    start = time.perf_counter()
    tracks = sample_and_track(pipeline, list(prompts), args)
    levels = {}
    for name, level_tracks in tracks.items():
        detected = [t.direction for t in level_tracks]
        levels[name] = direction_scores(list(wanted), detected)
    top = next(iter(tracks))
    report = {
        "run": str(args.run),
        "step": pipeline.step,
        "num": args.num,
        "sampler": args.sampler or pipeline.config.sample.sampler,
        "steps": args.steps,
        "guidance": pipeline.config.sample.guidance if args.guidance is None else args.guidance,
        "seed": args.seed,
        "chance": 0.25,
        "fraction": levels[top]["fraction"],
        "level": top,
        "levels": levels,
        "sprites": sprites,
        "clips": [
            {"prompt": prompt, "detected": t.direction, "dx": round(t.dx, 2), "dy": round(t.dy, 2)}
            for prompt, t in zip(prompts, tracks[top])
        ],
        "seconds": round(time.perf_counter() - start, 1),
    }
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
