"""What an unconditional run's innermost level has learnt: its x0 estimates of real images at several noise levels.

    python benchmarks/x0_predictions.py RUN --out x0.png [--times 300,600,800,900,950,980]

Noises 8 images of the run's data spread over the set (all levels, fixed noise) at each time t, asks the EMA
network for x0 and writes a grid: the clean images, then for every t the noisy input and the
estimate. Prints the estimates' MSE per t. The contrast with the run's own samples tells a
denoiser that has not learnt (blurry or noisy estimates) from samplers whose trajectories have
not yet learnt to compose (good estimates, patchwork samples; docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from matryoshka.data.build import build_dataset
from matryoshka.pipeline import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--times", default="300,600,800,900,950,980")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pipe = load_pipeline(args.run, device="cpu")
    process, model = pipe.process, pipe.model
    if model.config.num_classes or model.config.text_dim:
        raise SystemExit(f"{args.run} is a conditional run; this script asks unconditional runs only")
    dataset = build_dataset(pipe.config.data)
    picks = torch.linspace(0, len(dataset) - 1, 8).round().long().tolist()
    images = torch.stack([dataset[i]["image"] for i in picks])
    # A run still in its first progressive stage has only its inner levels: start at their top side.
    images = F.avg_pool2d(images, images.shape[-1] // pipe.resolution)
    pyramid = process.pyramid(images)
    inner = pyramid[-1]
    generator = torch.Generator().manual_seed(args.seed)
    noise = process.initial_noise(len(picks), images.shape[1], images.shape[-1], generator=generator)
    rows, errors = [inner], {}
    with torch.no_grad():
        for t in (int(v) for v in args.times.split(",")):
            steps = torch.full((len(picks),), t)
            z = process.add_noise(pyramid, steps, noise)
            # A self-conditioning model gets zeros: its estimate at the sampler's first step.
            preds = process.network_output(model, z, steps, None)
            x0 = process.x0_estimates(preds, z, steps)[-1].clamp(-1, 1)
            errors[t] = round(float((x0 - inner).pow(2).mean()), 4)
            rows += [z[-1].clamp(-1, 1), x0]
    print("x0 MSE per t:", errors)
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)
    pixels = ((grid + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    scale = max(1, 64 // inner.shape[-1])
    Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.NEAREST).save(args.out)
    print(f"grid (rows: clean, then noisy input and x0 estimate per t): {args.out}")


if __name__ == "__main__":
    main()
