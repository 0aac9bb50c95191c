"""Quality against training wall-clock: the old emoji64 recipe against the new one, on one machine.

    python benchmarks/time_to_quality.py --minutes 10 --points 5,10
    python benchmarks/time_to_quality.py --minutes 30 --points 10,20,30 --arms old,new
    python benchmarks/time_to_quality.py --minutes 6 --parallel --arm lr1e-3="train.lr=1e-3" --arms new,lr1e-3

Each arm is an ``mdm train`` run stopped at every wall-clock point (``train.max_minutes``
per segment; resuming is exact, so the segments add up to one run) and evaluated there
with ``mdm eval``: FD_effnet-lite0 of N DPM++(2M) samples against the whole emoji set,
at every level (the protocol of docs/evaluation.md); a progressive run still in its 16²
stage has only a 16² FD. Arms run one after the other with
all cores (the honest time-to-quality), or with ``--parallel`` side by side with one
thread each (a fair comparison at half the speed each, in half the time). Evaluation time
is not training time. Prints a table and writes JSON (and a plot when matplotlib is there).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

# Every recipe before session 21 sampled in 25 deterministic DPM++(2M) steps (its training-time grids; the
# evaluation always samples with DPM++(2M) in --steps).
INNER_RATE = ["sample.sampler=dpm++2m", "sample.eta=0", "sample.steps=25"]
# Every recipe before session 20 trained the 16² level at 1.2e-2 once nested.
PATCHED = [*INNER_RATE, "stages.1.lr=1.2e-2"]
# Every recipe before session 19 ran the 64² level on pixels, not 2x2 patches, and grew after up to 2,000 steps.
BEFORE_PATCHES = [
    *PATCHED,
    "stages.0.steps=2000",
    "model.levels.1.patch_size=1",
    "model.levels.1.channels=[16,32,64]",
    "model.levels.1.res_blocks=[1]",
    "model.levels.1.attention_layers=[1]",
]
# Every recipe before session 18 trained the grown level at the nested stage's rate.
ONE_RATE = [*BEFORE_PATCHES, "stages.1.grown_lr=null"]
# Every recipe before session 17 sampled without autoguidance and kept no guide snapshots.
UNGUIDED = [*ONE_RATE, "sample.autoguidance=1", "train.guide_snapshots=0"]
# The emoji64 recipe before issue 12, spelled out so it stays reproducible after the preset moves on.
OLD_RECIPE = [
    *UNGUIDED,
    "model.magnitude_preserving=false",
    "model.levels.0.res_blocks=[2,2,2]",
    "model.levels.0.attention_stages=[1,2]",
    "model.levels.1.channels=[32,64,64]",
    "model.levels.1.norm_groups=16",
    "stages=[]",
    "train.batch_size=32",
    "train.lr=4e-4",
    "train.warmup_steps=200",
    "train.channels_last=false",
    "diffusion.loss_weighting=none",
    "diffusion.upsampled_residual=false",
    "sample.spacing=mlmdm",
]
# Sessions 14-15 (the twelfth round of issue 12): GroupNorm blocks at their rates.
GROUPNORM_RECIPE = [*UNGUIDED, "model.magnitude_preserving=false", "train.lr=1e-3", "stages.1.lr=3e-4"]
# The first round of issue 12 (docs/benchmarks.md): no schedule shift, the nested stage at the run's lr.
ROUND1_RECIPE = [
    *GROUPNORM_RECIPE,
    "diffusion.logsnr_shift=0",
    "diffusion.shift_power=1",
    "stages=[{levels: 1, steps: 4000, minutes: 8}, {levels: 2, batch_size: 16}]",
    "diffusion.residual_upsampling=bicubic",
]
# The second round (sessions 4-6): the outer level refined the bicubically upsampled inner image.
ROUND2_RECIPE = [*GROUPNORM_RECIPE, "diffusion.residual_upsampling=bicubic"]
ARMS: dict[str, list[str]] = {
    "old": OLD_RECIPE,
    "round1": ROUND1_RECIPE,
    "round2": ROUND2_RECIPE,
    "groupnorm": GROUPNORM_RECIPE,
    "magnitude": UNGUIDED,  # session 16's recipe: magnitude-preserving blocks, sampled without autoguidance
    "autoguided": ONE_RATE,  # session 17's recipe: autoguided, the grown level at the nested stage's rate
    "grown-rate": BEFORE_PATCHES,  # session 18's recipe: the grown level at its own rate, on pixels
    "patched": PATCHED,  # session 19's recipe: the 64² level on 2x2 patches, growing after 1,250 steps
    "inner-rate": INNER_RATE,  # session 20's recipe: the nested 16² level at 6e-3
    "new": [],
}


def run(command: list[str], env: dict[str, str], log: Path) -> None:
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        result = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"command failed ({result.returncode}), see {log}: {' '.join(command)}")


def last_step(run_dir: Path) -> int:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return max(json.loads(line)["step"] for line in lines if line.strip())


def train_and_evaluate(name: str, overrides: list[str], args: argparse.Namespace, threads: int) -> list[dict]:
    """Train one arm to every wall-clock point, evaluating at each; returns one row per point."""
    run_dir = args.out / name
    log = args.out / f"{name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    rows, trained = [], 0.0
    for point in args.points:
        train = [
            "mdm",
            "train",
            args.preset,
            f"run_dir={run_dir}",
            f"train.max_minutes={point - trained}",
            "train.steps=1000000",
            "train.sample_every=1000000",
            "train.checkpoint_every=1000000",
            *overrides,
        ]
        start = time.perf_counter()
        run(train, env, log)
        trained = point
        step = last_step(run_dir)
        report = args.out / f"{name}_{point:g}min.json"
        run(
            [
                "mdm",
                "eval",
                str(run_dir),
                "--reference",
                str(args.reference),
                "--feature",
                "effnet-lite0",
                "--num",
                str(args.num),
                "--metrics",
                "fd",
                "--sampler",
                "dpm++2m",
                "--steps",
                str(args.steps),
                "--out",
                str(report),
            ],
            env,
            log,
        )
        metrics = json.loads(report.read_text())["metrics"]
        rows.append(
            {
                "arm": name,
                "minutes": point,
                "step": step,
                "wall_s": round(time.perf_counter() - start, 1),
                **{key: round(value, 2) for key, value in metrics.items()},
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10, help="training minutes per arm")
    parser.add_argument("--points", default="", help="comma-separated minutes to evaluate at (default: the end)")
    parser.add_argument("--arms", default="old,new")
    parser.add_argument(
        "--arm",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help="an extra arm: the preset with space-separated KEY=VALUE overrides",
    )
    parser.add_argument("--preset", default="emoji64")
    parser.add_argument("--num", type=int, default=128, help="samples per evaluation")
    parser.add_argument(
        "--steps", type=int, default=25, help="DPM++(2M) steps of every arm's evaluation (emoji64 samples otherwise)"
    )
    parser.add_argument("--reference", type=Path, help="emoji statistics from mdm eval-stats (made when missing)")
    parser.add_argument("--parallel", action="store_true", help="run the arms side by side, one thread each")
    parser.add_argument("--out", type=Path, default=Path("runs/time_to_quality"))
    args = parser.parse_args()

    arms = dict(ARMS)
    for spec in args.arm:
        name, _, overrides = spec.partition("=")
        arms[name] = shlex.split(overrides)
    names = args.arms.split(",")
    unknown = [name for name in names if name not in arms]
    if unknown:
        parser.error(f"unknown arms {unknown}; known: {', '.join(arms)}")
    args.points = sorted({float(p) for p in args.points.split(",") if p} | {args.minutes})
    args.out.mkdir(parents=True, exist_ok=True)
    if args.reference is None:
        args.reference = args.out / "emoji-ref-effnet.npz"
    if not args.reference.exists():
        run(
            [
                "mdm",
                "eval-stats",
                "emoji",
                "--resolution",
                "64",
                "--levels",
                "64,16",
                "--feature",
                "effnet-lite0",
                "--out",
                str(args.reference),
            ],
            dict(os.environ),
            args.out / "reference.log",
        )

    cores = os.cpu_count() or 1
    if args.parallel:
        threads = max(1, cores // len(names))
        command = [
            sys.executable,
            __file__,
            "--minutes",
            str(args.minutes),
            "--points",
            ",".join(map(str, args.points)),
            "--preset",
            args.preset,
            "--num",
            str(args.num),
            "--steps",
            str(args.steps),
            "--reference",
            str(args.reference),
            "--out",
            str(args.out),
        ]
        extra = [item for spec in args.arm for item in ("--arm", spec)]
        children = [
            subprocess.Popen([*command, *extra, "--arms", name], env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            for name in names
        ]
        if any(child.wait() for child in children):
            raise SystemExit("an arm failed; see its log in " + str(args.out))
        rows = [row for name in names for row in json.loads((args.out / f"{name}.json").read_text())]
    else:
        threads = int(os.environ.get("OMP_NUM_THREADS", cores))
        rows = []
        for name in names:
            arm_rows = train_and_evaluate(name, arms[name], args, threads)
            (args.out / f"{name}.json").write_text(json.dumps(arm_rows, indent=1) + "\n")
            rows += arm_rows

    levels = sorted({key for row in rows for key in row if key.startswith("fd_")}, reverse=True)
    print("| arm | minutes | steps | " + " | ".join(level.split("/")[-1] + " FD" for level in levels) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in levels) + " |")
    for row in rows:
        print(
            f"| {row['arm']} | {row['minutes']:g} | {row['step']} | "
            + " | ".join(f"{row[level]:.1f}" if level in row else "—" for level in levels)
            + " |"
        )
    summary = {
        "threads_per_arm": threads,
        "parallel": args.parallel,
        "cores": cores,
        "num": args.num,
        "sampler": f"dpm++2m-{args.steps}",
        "arms": {name: arms[name] for name in names},
        "rows": rows,
    }
    (args.out / "time_to_quality.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(rows, levels, args.out / "time_to_quality.png")


def plot(rows: list[dict], levels: list[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(1, len(levels), figsize=(5 * len(levels), 3.5), squeeze=False)
    for axis, level in zip(axes[0], levels):
        for arm in dict.fromkeys(row["arm"] for row in rows):
            points = sorted((row["minutes"], row[level]) for row in rows if row["arm"] == arm and level in row)
            if points:
                axis.plot(*zip(*points), marker="o", label=arm)
        axis.set(
            xlabel="training minutes", ylabel=f"FD_effnet-lite0 {level.split('/')[-1]}", title=level.split("/")[-1]
        )
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
