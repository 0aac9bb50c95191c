"""FD of an emoji run's samples with class labels drawn as often as the training data has them.

    python benchmarks/conditional_fd.py runs/sub --reference emoji-ref.npz --guidance 1 2 3
    python benchmarks/conditional_fd.py runs/emoji64 --reference emoji-ref.npz   # unconditional: the control

``mdm eval`` cycles a class-conditional model through its classes, which compares a uniform mix
of classes with the whole emoji set; the emoji groups and subgroups are far from uniform (people
and body: 2,148 of 3,656). Here sample i gets a label drawn from the run's own emoji labels
(``data.label``), so the FD against the whole set measures the samples alone: a conditional run
used as an unconditional generator. Unconditional runs are sampled as they are, with the same
seeds, so the two are comparable. Prints one JSON line per guidance scale: FD_effnet-lite0 of
``--num`` DPM++(2M) samples at every level (and with ``--grids``, a grid of the first 32).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from matryoshka.data import DataConfig, EmojiDataset
from matryoshka.evaluation.features import build_feature_extractor, images_to_uint8, uint8_to_images
from matryoshka.evaluation.sampling import level_sizes
from matryoshka.evaluation.stats import frechet_distance_to_samples
from matryoshka.pipeline import load_pipeline
from matryoshka.utils.images import save_grid


def data_labels(pipe) -> np.ndarray:
    """The emoji labels the run was trained on, one per training image."""
    data = pipe.config.data
    if data.source != "emoji":
        raise SystemExit(f"this probe reads emoji labels; the run was trained on {data.source!r}")
    return EmojiDataset(DataConfig(label=data.label, resolution=data.resolution)).labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--reference", type=Path, required=True, help="mdm eval-stats emoji statistics")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0])
    parser.add_argument("--num", type=int, default=128)
    parser.add_argument("--steps", type=int, default=25, help="DPM++(2M) steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grids", type=Path, help="write the first 32 samples of each level per guidance here")
    args = parser.parse_args()

    pipe = load_pipeline(args.run, device="cpu")
    conditional = bool(pipe.model.config.num_classes)
    labels = data_labels(pipe) if conditional else None
    reference = np.load(args.reference)
    extractor = build_feature_extractor("effnet-lite0")
    sizes = level_sizes(pipe)
    for guidance in args.guidance:
        rng = np.random.default_rng(args.seed)
        levels: list[list[np.ndarray]] = [[] for _ in sizes]
        for index, start in enumerate(range(0, args.num, args.batch_size)):
            count = min(args.batch_size, args.num - start)
            cond = pipe.condition(count, torch.as_tensor(rng.choice(labels, count))) if conditional else None
            images = pipe.generate(
                num=count, sampler="dpm++2m", steps=args.steps, guidance=guidance, cond=cond, seed=args.seed + index
            )
            for level, image in zip(levels, images):
                level.append(images_to_uint8(image))
        result = {"run": str(args.run), "step": pipe.step, "guidance": guidance, "num": args.num}
        for size, level in zip(sizes, levels):
            features = extractor(uint8_to_images(torch.from_numpy(np.concatenate(level))))
            fd = frechet_distance_to_samples(reference[f"mean_{size}"], reference[f"cov_{size}"], features)
            result[f"fd_{size}"] = round(fd, 1)
            if args.grids is not None:
                first = uint8_to_images(torch.from_numpy(np.concatenate(level)[:32]))
                save_grid(first, args.grids / f"g{guidance:g}_{size}px.png", columns=8)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
