"""Global pixel statistics of a run's evaluation samples against the real emoji, and what they cost in FD.

    python benchmarks/pixel_statistics.py RUN/eval/samples/step_..._ema_dpm++2m25_g1_seed0_b16 --level 16 \
        --reference REF.npz

Reads the sample cache of ``mdm eval`` (``batch_*.npz``) and prints, for the samples and for the
emoji set average-pooled to the same size (as the diffusion pyramid pools it): the share of
white pixels (every channel above 0.98 and above 0.9 in [-1, 1]), the mean and standard deviation
of the pixel values, and the mean absolute difference of horizontal neighbours (how busy the image
is). Then, as a diagnostic of what the background costs, the FD of the samples with every pixel
whose channels are all above 0.8 made pure white. Not a method: it shows how much of the FD the
off-white background of undertrained samples accounts for (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from matryoshka.data import DataConfig, EmojiDataset
from matryoshka.evaluation.features import build_feature_extractor, uint8_to_images
from matryoshka.evaluation.stats import frechet_distance_to_samples


def pixel_statistics(images: torch.Tensor) -> dict[str, float]:
    """Statistics of (N, 3, H, W) images in [-1, 1]."""
    darkest = images.amin(dim=1)
    return {
        "white > 0.98": float((darkest > 0.98).float().mean()),
        "white > 0.9": float((darkest > 0.9).float().mean()),
        "mean": float(images.mean()),
        "std": float(images.std()),
        "neighbour difference": float((images[..., 1:] - images[..., :-1]).abs().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", type=Path, help="an mdm eval sample cache folder")
    parser.add_argument("--level", type=int, default=16, help="side of the level to read (level_<side> in the cache)")
    parser.add_argument("--reference", type=Path, required=True, help="statistics from mdm eval-stats emoji")
    args = parser.parse_args()

    batches = [np.load(path) for path in sorted(args.samples.glob("batch_*.npz"))]
    if not batches or f"level_{args.level}" not in batches[0].files:
        raise SystemExit(f"no batch_*.npz with level_{args.level} in {args.samples}")
    samples = uint8_to_images(torch.from_numpy(np.concatenate([b[f"level_{args.level}"] for b in batches])))
    real_set = EmojiDataset(DataConfig(resolution=64))
    real = uint8_to_images(torch.from_numpy(np.asarray(real_set.table.images[real_set.items])).permute(0, 3, 1, 2))
    real = F.avg_pool2d(real, 64 // args.level) if args.level < 64 else real

    reference = np.load(args.reference)
    mean, cov = reference[f"mean_{args.level}"], reference[f"cov_{args.level}"]
    extractor = build_feature_extractor(str(reference["feature_name"]))
    near_white = (samples.amin(dim=1, keepdim=True) > 0.8).expand_as(samples)
    result = {
        "num": len(samples),
        "real": pixel_statistics(real),
        "samples": pixel_statistics(samples),
        "fd": round(frechet_distance_to_samples(mean, cov, extractor(samples)), 1),
        "fd, near-white made white": round(
            frechet_distance_to_samples(mean, cov, extractor(torch.where(near_white, 1.0, samples))), 1
        ),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
