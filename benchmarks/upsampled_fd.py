"""FD at the top level of a run's evaluation samples against their own inner level upsampled.

    python benchmarks/upsampled_fd.py RUN/eval/samples/step_..._ema_dpm++2m25_g1_seed0_b16 --reference REF.npz

Reads the sample cache that ``mdm eval`` writes (``batch_*.npz`` with ``level_64`` and ``level_16``) and
prints FD_effnet-lite0 at 64² of the 64² level and of the 16² level upsampled (bicubic, bilinear, nearest):
whether the 64² level adds anything over upsampling its inner image (docs/benchmarks.md). A run still in its
first stage has no 64² level yet: then only its inner level upsampled is scored, which compares inner levels of
different sides (``--inner 32``) by the 64² image they would start from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from matryoshka.diffusion.spacetime import upsample
from matryoshka.evaluation.features import build_feature_extractor, images_to_uint8, uint8_to_images
from matryoshka.evaluation.stats import frechet_distance_to_samples
from matryoshka.utils.images import save_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", type=Path, help="an mdm eval sample cache folder")
    parser.add_argument("--reference", type=Path, required=True, help="statistics from mdm eval-stats (64 and 16)")
    parser.add_argument("--top", type=int, default=64)
    parser.add_argument("--inner", type=int, default=16)
    parser.add_argument("--grid", type=Path, help="also save the first 16 inner samples upsampled bilinearly here")
    args = parser.parse_args()

    batches = [np.load(path) for path in sorted(args.samples.glob("batch_*.npz"))]
    if not batches:
        raise SystemExit(f"no batch_*.npz in {args.samples}")
    has_top = f"level_{args.top}" in batches[0]
    inner = uint8_to_images(torch.from_numpy(np.concatenate([b[f"level_{args.inner}"] for b in batches])))
    reference = np.load(args.reference)
    mean, cov = reference[f"mean_{args.top}"], reference[f"cov_{args.top}"]
    extractor = build_feature_extractor("effnet-lite0")

    def fd(pixels: np.ndarray) -> float:
        return round(frechet_distance_to_samples(mean, cov, extractor(uint8_to_images(torch.from_numpy(pixels)))), 1)

    scale = args.top // args.inner
    result: dict[str, float | int] = {"num": len(inner)}
    if has_top:
        result[f"{args.top}px level"] = fd(np.concatenate([b[f"level_{args.top}"] for b in batches]))
    for mode in ("bicubic", "bilinear", "nearest"):
        upsampled = upsample(inner, scale, mode=mode).clamp(-1, 1)
        result[f"{args.inner}px level, {mode}"] = fd(images_to_uint8(upsampled))
        if args.grid and mode == "bilinear":
            save_grid(upsampled[:16], args.grid, columns=8)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
