"""EMA lengths compared on one run, after the fact, from its raw weights saved every few steps.

    mdm train emoji64 run_dir=runs/ema train.max_minutes=6 train.checkpoint_every=10 train.keep_checkpoints=100000
    python benchmarks/posthoc_ema.py runs/ema --spans 2 4 10 --out runs/ema-spans
    mdm eval runs/ema-spans/span_4 --reference REF.npz --num 128 --metrics fd     # for each span

The trainer's EMA takes decay (1 + n) / (span + n) after n updates (span 10, capped at
``train.ema_decay``), an average over roughly the last n / (span - 1) steps: span 2 averages the
whole run evenly, larger spans the recent steps only. This replays that average over the run's
raw weights (``model.safetensors`` of every checkpoint), holding each saved tensor for the steps
until the next one, so every span is judged on the same training run (as in EDM2's post-hoc EMA,
Karras et al. 2024). Each span becomes a run folder: a copy of the last checkpoint with those
averaged weights as its EMA, and a link to the run's autoguidance snapshots (``RUN/guides``), so
that ``mdm sample`` and ``mdm eval`` guide it as they guide the run.

``--grown`` replays only the level(s) that a progressive run grew last, whose average the trainer
restarted at growth (``ema_started`` in ``state.pt``): from their initial weights, rebuilt as the
trainer built them, over the checkpoints since; the inner levels keep the run's own EMA.
``--hold-steps`` replays ``train.ema_grown_hold_steps``; span ``none`` is the capped decay from the
first step, with no warm-up (an average that holds the initial weights for ~1/(1 - cap) steps):

    mdm train --resume runs/demo train.checkpoint_every=20 train.keep_checkpoints=100000   # past a growth
    python benchmarks/posthoc_ema.py runs/demo --grown --spans 10 none --out runs/demo-spans  # --hold-steps 300
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from matryoshka.checkpoints import list_checkpoints, load_train_state
from matryoshka.config.presets import load_run_config
from matryoshka.data.loader import mix_seed
from matryoshka.guides import GUIDES_DIR
from matryoshka.models import NestedUNet
from matryoshka.training.ema import warmup_decay


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step_"))


def replay(
    checkpoints: list[Path],
    span: float | None,
    cap: float,
    start: dict[str, torch.Tensor] | None = None,
    since: int = 0,
    floor: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The trainer's EMA with warm-up ``span`` (None: none) and decay ``floor`` over raw weights held
    between checkpoints, of the tensors in ``start`` (their weights at step ``since``) or, without it,
    of all from the first."""
    average = None if start is None else {name: value.double() for name, value in start.items()}
    step = since
    for checkpoint in (c for c in checkpoints if step_of(c) > since or start is None):
        weights = {
            name: value.double()
            for name, value in load_file(checkpoint / "model.safetensors").items()
            if start is None or name in start
        }
        until = step_of(checkpoint)
        if average is None:
            average = {name: value.clone() for name, value in weights.items()}
        # Updates towards the same weights compose: what remains of the average is the product of the decays.
        kept = math.prod(cap if span is None else warmup_decay(n - since, cap, span, floor) for n in range(step, until))
        for name, value in weights.items():
            average[name].lerp_(value, 1 - kept)
        step = until
    return {name: value.float() for name, value in average.items()}


def grown_start(run: Path, last: Path) -> tuple[dict[str, torch.Tensor], int]:
    """Initial weights of the tensors whose average restarted at the last growth, and that step (an
    update count, which equals the step unless non-finite steps were skipped)."""
    state = load_train_state(last / "state.pt")
    started = state.get("ema_started", {})
    since = max(started.values(), default=0)
    names = {name for name, count in started.items() if count == since}
    if not since:
        raise SystemExit(f"{run} has not grown: nothing for --grown to replay")
    config = load_run_config(run / "config.yaml")
    levels = int(state["num_levels"])
    torch.manual_seed(mix_seed(config.train.seed, levels))  # as the trainer builds a grown model
    initial = NestedUNet(config.model.truncated(levels)).state_dict()
    return {name: initial[name] for name in names}, since


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run saved every few steps (train.checkpoint_every)")
    parser.add_argument("--spans", nargs="+", default=["2", "4", "10"], help="warm-up spans, or none")
    parser.add_argument("--cap", type=float, default=0.999, help="the decay's cap (train.ema_decay)")
    parser.add_argument("--grown", action="store_true", help="replay only the level(s) grown last")
    parser.add_argument("--hold-steps", type=int, default=0, help="with --grown: train.ema_grown_hold_steps")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    checkpoints = list_checkpoints(args.run)
    if len(checkpoints) < 2:
        raise SystemExit(f"{args.run} has {len(checkpoints)} checkpoints: train it with a small train.checkpoint_every")
    start, since = grown_start(args.run, checkpoints[-1]) if args.grown else (None, 0)
    for name in args.spans:
        span = None if name == "none" else float(name)
        if span is not None and span <= 1:
            raise SystemExit(f"span must be > 1 or none, got {name}")
        folder = args.out / (f"span_{name}" + (f"_hold{args.hold_steps}" if args.hold_steps else ""))
        target = folder / "checkpoints" / checkpoints[-1].name
        shutil.copytree(checkpoints[-1], target)
        if (args.run / GUIDES_DIR).is_dir():  # a run-shaped folder, so that mdm eval autoguides it as the run
            (folder / GUIDES_DIR).symlink_to((args.run / GUIDES_DIR).resolve(), target_is_directory=True)
        floor = 1 - 1 / args.hold_steps if args.hold_steps else 0.0
        averaged = replay(checkpoints, span, args.cap, start, since, floor)
        if start is not None:  # the inner levels keep the run's own average
            averaged = {**load_file(checkpoints[-1] / "ema.safetensors"), **averaged}
        save_file(averaged, target / "ema.safetensors")
        print(f"span {name}: {folder} ({sum(step_of(c) > since for c in checkpoints)} checkpoints)")


if __name__ == "__main__":
    main()
