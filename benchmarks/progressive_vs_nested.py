"""The paper's progressive-training claim at small scale, on the emoji data at 64².

Three runs, each given the same wall-clock budget on this machine, one after the other:

- progressive: the 16² inner UNet of ``emoji64`` trained alone for half the budget, then
  grown into the nested 64²/16² model for the other half (``stages``, the first one
  ending on its ``minutes``);
- nested: the nested ``emoji64`` model trained for the whole budget (``stages=[]``);
- single: the single-level 64² ``unet64`` (similar parameter count) for the whole budget.

Each is evaluated by the Fréchet distance of effnet-lite0 features (not FID-comparable)
between samples and the emoji set, at every level.

    python benchmarks/progressive_vs_nested.py --minutes 8 --num 500 --out benchmarks/results/progressive.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from matryoshka.config.presets import emoji64, with_groupnorm_blocks
from matryoshka.config.run import StageConfig
from matryoshka.evaluation.evaluate import evaluate_pipeline
from matryoshka.models.presets import unet64
from matryoshka.pipeline import load_pipeline
from matryoshka.training.trainer import Trainer


def train(config, minutes: float) -> dict:
    config = replace(config, train=replace(config.train, max_minutes=minutes, steps=1_000_000, sample_every=1_000_000))
    trainer = Trainer(config, quiet=True)
    start = time.perf_counter()
    trainer.train()
    return {"steps": trainer.step, "minutes": round((time.perf_counter() - start) / 60, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-clock training budget per run")
    parser.add_argument("--num", type=int, default=500, help="samples per evaluation")
    parser.add_argument("--steps", type=int, default=25, help="DPM++(2M) sampling steps")
    parser.add_argument("--root", default="runs/progressive-benchmark")
    parser.add_argument("--out", default="benchmarks/results/progressive.json")
    parser.add_argument(
        "--groupnorm", action="store_true", help="GroupNorm blocks at their rates (the recipe before session 16)"
    )
    args = parser.parse_args()
    root = Path(args.root)
    base = with_groupnorm_blocks(emoji64()) if args.groupnorm else emoji64()
    single_level = replace(unet64(), magnitude_preserving=base.model.magnitude_preserving)
    growth = [StageConfig(levels=1, steps=1_000_000, minutes=args.minutes / 2), StageConfig(levels=2)]
    runs = {
        "progressive": replace(base, run_dir=str(root / "progressive"), stages=growth),
        "nested": replace(base, run_dir=str(root / "nested"), stages=[]),
        "single": replace(base, run_dir=str(root / "single"), model=single_level, stages=[]),
    }
    results = {}
    for name, config in runs.items():
        results[name] = train(config, args.minutes)
        if name == "progressive":
            history = json.loads((root / name / "stages.json").read_text())
            results[name]["steps"] = (
                f"{history[1]['start_step']} (16² alone) + {results[name]['steps'] - history[1]['start_step']} (nested)"
            )
        pipeline = load_pipeline(config.run_dir)
        metrics = evaluate_pipeline(pipeline, "emoji", num=args.num, sampler="dpm++2m", steps=args.steps, seed=0)
        results[name]["parameters_M"] = round(sum(p.numel() for p in pipeline.model.parameters()) / 1e6, 2)
        results[name].update({key: round(value, 2) for key, value in metrics.items()})
        print(name, results[name], flush=True)
    report = {
        "minutes_per_run": args.minutes,
        "num_samples": args.num,
        "sampler": f"dpm++2m/{args.steps}",
        "cpu_threads": torch.get_num_threads(),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
