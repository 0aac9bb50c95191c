"""FD of real emoji seen through a lower resolution: the ceiling of a base level of that side.

    python benchmarks/blurred_reference_fd.py --reference REF.npz --num 256 --sides 64 32 16 8

Draws ``--num`` emoji at random (seeded), average-pools them to each side as the training pyramid does,
upsamples them back bilinearly (as ``diffusion.residual_upsampling=bilinear``) and prints one JSON line:
FD_effnet-lite0 at the top resolution against ``--reference`` (``mdm eval-stats``). Side 64 is the floor of
real images at this N; a model's base-level samples upsampled (``upsampled_fd.py``) cannot beat its side's
figure, and the gap between them is what the base level has still to learn (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from matryoshka.data import DataConfig, EmojiDataset
from matryoshka.diffusion.spacetime import downsample, upsample
from matryoshka.evaluation.features import build_feature_extractor
from matryoshka.evaluation.stats import frechet_distance_to_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, required=True, help="statistics from mdm eval-stats")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--num", type=int, default=128)
    parser.add_argument("--sides", type=int, nargs="+", default=[64, 32, 16, 8])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = EmojiDataset(DataConfig(resolution=args.resolution))
    picks = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[: args.num]
    images = torch.stack([data[int(i)]["image"] for i in picks])
    reference = np.load(args.reference)
    mean, cov = reference[f"mean_{args.resolution}"], reference[f"cov_{args.resolution}"]
    extractor = build_feature_extractor("effnet-lite0")

    result: dict[str, float | int] = {"num": args.num}
    for side in args.sides:
        factor = args.resolution // side
        seen = upsample(downsample(images, factor), factor, mode="bilinear")
        fd = frechet_distance_to_samples(mean, cov, extractor(seen.clamp(-1, 1)))
        result[f"through {side}px"] = round(fd, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
