"""torchrun on CPU (gloo, 2 processes): DDP parity with one process, FSDP2 checkpoints, failure handling."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from matryoshka.cli.main import main

from .test_cli import make_image_folder, metrics

# fp32 on every machine: the parity tests compare to 1e-4, which bf16 autocast (train.precision=auto
# on CPUs with native bf16) does not keep between one batch and two half batches.
COMMON = [
    "train.log_every=1",
    "train.sample_every=1000",
    "train.warmup_steps=2",
    "sample.steps=2",
    "sample.num=2",
    "train.precision=fp32",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), count=24)


def torchrun(*args: str, nproc: int = 2, timeout: float = 240, preset: str = "tiny") -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--standalone",
        "-m",
        "matryoshka.cli",
        "train",
        preset,
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("self_condition", [False, True])
def test_ddp_two_ranks_match_one_process_with_double_batch(tmp_path, folder, self_condition):
    # Rank r reads positions r, r + 2, ... of the batch, so the first halves of the two ranks' batches
    # (the samples that self-conditioning feeds estimates to) are the first half of the double batch.
    data = ["data.source=imagefolder", f"data.path={folder}", f"model.self_condition={str(self_condition).lower()}"]
    two = torchrun(f"run_dir={tmp_path / 'two'}", "train.batch_size=4", "train.steps=4", *data, *COMMON)
    assert two.returncode == 0, two.stderr[-3000:]
    torch.set_num_threads(1)
    assert (
        main(["train", "tiny", f"run_dir={tmp_path / 'one'}", "train.batch_size=8", "train.steps=4", *data, *COMMON])
        == 0
    )

    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    np.testing.assert_allclose([m["loss"] for m in b], [m["loss"] for m in a], rtol=1e-4)
    assert b[-1]["images_per_s"] > 0
    one = load_file(tmp_path / "one/checkpoints/step_00000004/model.safetensors")
    for key, value in load_file(tmp_path / "two/checkpoints/step_00000004/model.safetensors").items():
        torch.testing.assert_close(value, one[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_joint_image_and_video_batches_on_two_ranks_match_one_process(tmp_path, strategy):
    """Each rank's batch is an image pass and a clip pass: two ranks of 4 train as one process of 8."""
    joint = ["data.image_source=emoji", "data.image_fraction=0.5", "train.steps=3", "train.guide_snapshots=1", *COMMON]
    two = torchrun(
        f"run_dir={tmp_path / 'two'}", f"train.strategy={strategy}", "train.batch_size=4", *joint, preset="tiny-video"
    )
    assert two.returncode == 0, two.stderr[-3000:]
    torch.set_num_threads(1)
    assert main(["train", "tiny-video", f"run_dir={tmp_path / 'one'}", "train.batch_size=8", *joint]) == 0
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for key in ("loss", "loss/4x16x16", "loss/2x8x8"):
        np.testing.assert_allclose([m[key] for m in b], [m[key] for m in a], rtol=1e-4, err_msg=key)
    for weights in ("checkpoints/step_00000003/model.safetensors", "guides/step_00000002.safetensors"):
        one = load_file(tmp_path / "one" / weights)  # guide snapshots: the EMA, gathered from the shards
        for key, value in load_file(tmp_path / "two" / weights).items():
            torch.testing.assert_close(value, one[key], rtol=1e-4, atol=1e-5)


def test_fsdp_trains_checkpoints_and_resumes_on_one_process(tmp_path, folder):
    run = tmp_path / "fsdp"
    # Self-conditioning adds a forward pass without gradients before each step's training pass.
    data = ["data.source=imagefolder", f"data.path={folder}", "model.self_condition=true"]
    result = torchrun(
        f"run_dir={run}", "train.strategy=fsdp", "train.steps=3", "train.checkpoint_every=3", *data, *COMMON
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "samples" / "step_00000003_16px.png").is_file()
    state = torch.load(run / "checkpoints/step_00000003/state.pt", weights_only=True)
    assert state["step"] == 3 and len(state["optimizer"]["state"]) > 0

    assert main(["train", "tiny", f"run_dir={run}", "train.steps=5", "model.self_condition=true"]) == 0  # same run
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5]
    out = tmp_path / "out"
    assert main(["sample", str(run), "--num", "2", "--steps", "2", "--out", str(out)]) == 0
    assert len(list((out / "16px").glob("*.png"))) == 2


def test_killing_one_rank_ends_the_job_with_an_error(tmp_path, folder):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "--monitor_interval=0.5",
        "-m",
        "matryoshka.cli",
        "train",
        "tiny",
        f"run_dir={tmp_path / 'run'}",
        "train.steps=100000",
        "data.source=imagefolder",
        f"data.path={folder}",
        *COMMON,
    ]
    launcher = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        metrics_file = tmp_path / "run" / "metrics.jsonl"
        deadline = time.time() + 120
        while not (metrics_file.exists() and metrics_file.read_text().count("\n") >= 2):
            assert launcher.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.2)
        workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        os.kill(int(workers[1]), signal.SIGKILL)
        start = time.time()
        code = launcher.wait(timeout=90)
        assert code != 0
        assert time.time() - start < 90
    finally:
        if launcher.poll() is None:
            launcher.kill()


RANK0_WORK = """
import time, torch, torch.distributed as dist
from matryoshka.training.distributed import init_distributed
context = init_distributed("cpu", timeout_minutes=0.05)  # 3 s: any ordinary collective wait longer fails
result = context.run_on_main(lambda: time.sleep(8) or "sampled")
flag = torch.tensor([float(context.rank)])
dist.all_reduce(flag)  # the ranks are still in step afterwards
print(f"rank {context.rank}: {result} {flag.item()}")
dist.destroy_process_group()
"""


def test_rank0_work_longer_than_the_collective_timeout_does_not_kill_the_job(tmp_path):
    script = tmp_path / "rank0_work.py"
    script.write_text(RANK0_WORK)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0: sampled 1.0" in result.stdout and "rank 1: None 1.0" in result.stdout
