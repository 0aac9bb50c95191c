"""The video benchmarks: memory of a training step (benchmarks/video_memory.py), motion direction
(benchmarks/motion_direction.py), run small."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from matryoshka.cli.main import main as mdm

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.log_every=1", "train.sample_every=1000", "train.warmup_steps=1", "sample.steps=2", "sample.num=2"]


def benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(module, args: list[str], capsys, monkeypatch) -> dict:
    monkeypatch.setattr(sys, "argv", [module.__name__, *args])
    module.main()
    return json.loads(capsys.readouterr().out)


def test_live_bytes_counts_what_autograd_keeps_and_not_views():
    live_bytes = benchmark("video_memory").LiveBytes
    x = torch.randn(1000, requires_grad=True)  # made before: not counted
    with live_bytes() as counter:
        y = x.exp()  # 4000 bytes, kept by exp for its backward
        view = y.t()  # the same memory
        total = y.sum()  # 4 bytes
        del y, view
        assert counter.live == 4004  # y is gone from Python but autograd holds it
        total.backward()  # frees exp's result, makes x.grad (4000) and temporaries
        assert counter.live == 4004 and counter.peak >= 8004
        del total
        assert counter.live == 4000


def test_video_memory_extrapolates_to_what_it_measures(capsys, monkeypatch):
    """tiny-video measured at 2-4 frames up to 48², predicted and measured at 4 frames at 96²
    (where the attention matrices are a third of the memory)."""
    args = ["--preset", "tiny-video", "--target-frames", "4", "--target-side", "96", "--check", "--gpus", "1,4"]
    report = run_main(benchmark("video_memory"), args, capsys, monkeypatch)
    assert report["attention_matrices_per_layer"] == {"kept": 1.0, "backward_peak": 3.0}
    plain, checkpointing = report["plain"], report["checkpointing"]
    assert abs(plain["held_out_error"]) < 0.01
    assert plain["target_per_clip_GiB"] == pytest.approx(plain["target_measured_GiB"], rel=0.03)
    assert plain["target_attention_per_clip_GiB"] > 0.25 * plain["target_per_clip_GiB"]
    # With checkpointing the sum of terms peaking at different moments bounds the peak from above.
    measured = checkpointing["target_measured_GiB"]
    assert measured < 0.5 * plain["target_measured_GiB"]
    assert measured * 0.98 <= checkpointing["target_per_clip_GiB"] <= measured * 1.4
    assert [(row["gpus"], row["strategy"]) for row in report["per_gpu"]] == [
        (1, "ddp"),
        (1, "fsdp2"),
        (4, "ddp"),
        (4, "fsdp2"),
    ]


def test_training_state_per_gpu():
    """20 bytes a parameter on every DDP replica; FSDP2 divides them and gathers a unit or two."""
    rows = benchmark("video_memory").per_gpu(2**30, 2**27, {"plain": 10.0, "checkpointing": 2.0}, [1, 8])
    one_ddp, one_fsdp, ddp, fsdp = rows
    assert one_ddp["state_GiB"] == one_fsdp["state_GiB"] == ddp["state_GiB"] == 20
    assert fsdp["state_GiB"] == 20 / 8 + 3 * 4 / 8  # weights, prefetched weights, gradients of 1/8 GiB units
    assert ddp["total_GiB"] == {"plain": 30, "checkpointing": 22}
    assert fsdp["total_GiB"] == {"plain": 14, "checkpointing": 6}


def test_motion_direction_runs_on_a_text_video_run(tmp_path, capsys, monkeypatch):
    run = tmp_path / "text-video"
    text = ["model.text_dim=384", "text.encoder=minilm", "data.captions=true"]
    assert mdm(["train", "tiny-video", f"run_dir={run}", "train.steps=1", *text, *FAST]) == 0
    capsys.readouterr()
    module = benchmark("motion_direction")
    out = tmp_path / "motion.json"
    report = run_main(module, ["--run", str(run), "--num", "8", "--steps", "1", "--out", str(out)], capsys, monkeypatch)
    assert json.loads(out.read_text()) == report
    assert report["level"] == "4x16x16" and sorted(report["levels"]) == ["2x8x8", "4x16x16"]
    assert len(report["sprites"]) == 2 and report["chance"] == 0.25
    prompts = [clip["prompt"] for clip in report["clips"]]
    assert prompts[:4] == [f"{report['sprites'][0]} moving {d}" for d in ("left", "right", "up", "down")]
    top = report["levels"]["4x16x16"]
    assert top["clips"] == 8 and all(top["per_direction"][d]["clips"] == 2 for d in ("left", "right", "up", "down"))
    assert 0 <= report["fraction"] <= 1

    image = tmp_path / "unconditional"
    assert mdm(["train", "tiny-video", f"run_dir={image}", "train.steps=1", *FAST]) == 0
    with pytest.raises(SystemExit, match="no text conditioning"):
        run_main(module, ["--run", str(image), "--num", "4"], capsys, monkeypatch)
    with pytest.raises(SystemExit):
        run_main(module, ["--run", str(run), "--num", "6"], capsys, monkeypatch)
    assert "multiple of 4" in capsys.readouterr().err
