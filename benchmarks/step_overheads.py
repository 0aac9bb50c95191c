"""Time the parts of a training step that are not the network: optimizer, EMA, checks, randomness, data.

Run on the 16² UNet of ``emoji64`` (7.6M parameters, its first progressive stage) with random
gradients, each part 50 times after one warm-up call; milliseconds per call. Set OMP_NUM_THREADS
to the thread count of the run being explained.

    OMP_NUM_THREADS=2 python benchmarks/step_overheads.py
"""

from __future__ import annotations

import time

import torch

from matryoshka.config.presets import load_run_config
from matryoshka.data import build_dataset
from matryoshka.models import NestedUNet
from matryoshka.pipeline import build_process
from matryoshka.training.batches import sample_randomness
from matryoshka.training.ema import EMA
from matryoshka.training.state import all_finite


def milliseconds(call, repeats: int = 50) -> float:
    call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    config = load_run_config("emoji64")
    model = NestedUNet(config.model.truncated(1))
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter) * 1e-3
    rows = {}
    for name, options in (
        ("AdamW, per-tensor loop", {}),
        ("AdamW, foreach", {"foreach": True}),
        ("AdamW, fused", {"fused": True}),
    ):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.99), **options)
        rows[name] = milliseconds(optimizer.step)
    ema = EMA(model, 0.999, True, 0)
    rows["EMA update"] = milliseconds(lambda: ema.update(model))
    rows["finiteness check of the weights"] = milliseconds(lambda: all_finite(list(model.parameters())))
    rows["gradient clipping"] = milliseconds(lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    process = build_process(config, 1)
    images = torch.randn(8, 3, 16, 16)
    rows["per-sample times and noise, batch 8"] = milliseconds(
        lambda: sample_randomness(process, list(range(8)), images, 0, 5, 0.1)
    )
    dataset = build_dataset(config.data)
    rows["8 dataset items"] = milliseconds(lambda: [dataset[(i, i)] for i in range(8)])
    print(f"{torch.get_num_threads()} threads, 7.6M parameters")
    for name, value in rows.items():
        print(f"{name:40s} {value:6.2f} ms")


if __name__ == "__main__":
    main()
