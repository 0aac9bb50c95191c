"""FD of a run sampled with probe settings the samplers do not offer (docs/benchmarks.md, third round).

    python benchmarks/sampling_probes.py RUN --reference REF.npz --grid logsnr           # steps uniform in logSNR
    python benchmarks/sampling_probes.py RUN --reference REF.npz --grid logsnr --from -6  # ... from logSNR -6
    python benchmarks/sampling_probes.py RUN --reference REF.npz --guide-by WEAK_RUN --weight 2
    python benchmarks/sampling_probes.py RUN --reference REF.npz --guide-by RUN --weak-raw --weight 2

``--grid logsnr``: the 25 DPM++(2M) times are placed uniformly in the innermost level's logSNR
instead of uniformly in t. ``--guide-by``: autoguidance (Karras et al. 2024), each prediction
pushed away from a weaker model's, weak + w (strong - weak); ``--weak-raw`` takes that model's
raw weights instead of its EMA. Evaluates a copy of RUN (``OUT``/run) with ``mdm eval``, so the
sample cache of RUN is not touched.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

import matryoshka.diffusion.samplers as samplers
import matryoshka.pipeline as pipeline_module
from matryoshka.cli.main import main as mdm
from matryoshka.diffusion.autoguidance import Autoguided


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/sampling_probes"))
    parser.add_argument("--grid", choices=["trailing", "logsnr"], default="trailing")
    parser.add_argument("--from", dest="start", type=float, help="with --grid logsnr: the first step's logSNR")
    parser.add_argument("--guide-by", type=Path, help="the weaker run of autoguidance")
    parser.add_argument("--weak-raw", action="store_true")
    parser.add_argument("--weight", type=float, default=2.0)
    parser.add_argument("--num", type=int, default=128)
    args = parser.parse_args()

    load, build = pipeline_module.load_pipeline, pipeline_module.build_process
    inner_log_snr = []

    def build_noting_schedule(config, num_levels=None, one_frame=False):
        process = build(config, num_levels, one_frame)
        times = torch.arange(process.num_steps + 1).clamp(min=1)
        inner_log_snr[:] = [process.schedule_for_level(process.num_levels - 1).log_snr(times)]
        return process

    def logsnr_grid(num_train_steps, steps, spacing="trailing"):
        log_snr = inner_log_snr[0]
        first = float(log_snr[num_train_steps]) if args.start is None else args.start
        grid = [num_train_steps]
        for target in torch.linspace(first, float(log_snr[1]), steps)[1:]:
            nearest = int(torch.argmin((log_snr[1:] - target).abs())) + 1
            grid.append(min(nearest, grid[-1] - 1))
        return [*grid, 0]

    def load_guided(path, use_ema=True, device="auto"):
        pipe = load(path, use_ema, device)
        weak = load(args.guide_by, not args.weak_raw, device)
        pipe.model = Autoguided(pipe.model, weak.model, args.weight).eval()
        return pipe

    pipeline_module.build_process = build_noting_schedule
    if args.grid == "logsnr":
        samplers.sampling_timesteps = logsnr_grid
    if args.guide_by is not None:
        pipeline_module.load_pipeline = load_guided
    copy = args.out / "run"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(args.run, copy, ignore=shutil.ignore_patterns("eval"))
    report = args.out / "report.json"
    command = ["eval", str(copy), "--reference", str(args.reference), "--feature", "effnet-lite0", "--num"]
    command += [str(args.num), "--metrics", "fd", "--sampler", "dpm++2m", "--steps", "25", "--out", str(report)]
    raise SystemExit(mdm(command))


if __name__ == "__main__":
    main()
