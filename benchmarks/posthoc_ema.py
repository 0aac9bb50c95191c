"""EMA lengths compared on one run, after the fact, from its raw weights saved every few steps.

    mdm train emoji64 run_dir=runs/ema train.max_minutes=6 train.checkpoint_every=10 train.keep_checkpoints=100000
    python benchmarks/posthoc_ema.py runs/ema --spans 2 4 10 --out runs/ema-spans
    mdm eval runs/ema-spans/span_4 --reference REF.npz --num 128 --metrics fd     # for each span

The trainer's EMA takes decay (1 + n) / (span + n) after n updates (span 10, capped at
``train.ema_decay``), an average over roughly the last n / (span - 1) steps: span 2 averages the
whole run evenly, larger spans the recent steps only. This replays that average over the run's
raw weights (``model.safetensors`` of every checkpoint), holding each saved tensor for the steps
until the next one, so every span is judged on the same training run (as in EDM2's post-hoc EMA,
Karras et al. 2024). Each span becomes a copy of the last checkpoint with those averaged weights
as its EMA, ready for ``mdm sample`` and ``mdm eval``.
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from matryoshka.checkpoints import list_checkpoints
from matryoshka.training.ema import warmup_decay


def replay(checkpoints: list[Path], span: float, cap: float) -> dict[str, torch.Tensor]:
    """The trainer's EMA with warm-up ``span`` over raw weights held between checkpoints."""
    average: dict[str, torch.Tensor] | None = None
    step = 0
    for checkpoint in checkpoints:
        weights = {name: value.double() for name, value in load_file(checkpoint / "model.safetensors").items()}
        until = int(checkpoint.name.removeprefix("step_"))
        if average is None:
            average = {name: value.clone() for name, value in weights.items()}
        # Updates towards the same weights compose: what remains of the average is the product of the decays.
        kept = math.prod(warmup_decay(n, cap, span) for n in range(step, until))
        for name, value in weights.items():
            average[name].lerp_(value, 1 - kept)
        step = until
    return {name: value.float() for name, value in average.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run saved every few steps (train.checkpoint_every)")
    parser.add_argument("--spans", nargs="+", type=float, default=[2.0, 4.0, 10.0])
    parser.add_argument("--cap", type=float, default=0.999, help="the decay's cap (train.ema_decay)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    checkpoints = list_checkpoints(args.run)
    if len(checkpoints) < 2:
        raise SystemExit(f"{args.run} has {len(checkpoints)} checkpoints: train it with a small train.checkpoint_every")
    for span in args.spans:
        if span <= 1:
            raise SystemExit(f"span must be > 1, got {span}")
        target = args.out / f"span_{span:g}"
        shutil.copytree(checkpoints[-1], target)
        save_file(replay(checkpoints, span, args.cap), target / "ema.safetensors")
        print(f"span {span:g}: {target} ({len(checkpoints)} checkpoints)")


if __name__ == "__main__":
    main()
