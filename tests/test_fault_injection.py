"""Faults done for real: kill -9 mid-checkpoint, SIGTERM, a full disk, crafted files, divergence."""

import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from matryoshka.checkpoints import (
    CheckpointError,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
    load_tensors,
    load_train_state,
)
from matryoshka.cli.main import main
from matryoshka.config.presets import tiny
from matryoshka.data.config import DataConfig
from matryoshka.pipeline import load_pipeline
from matryoshka.training.trainer import Trainer, TrainingStopped

from .test_cli import make_image_folder, metrics

FAST = ["train.log_every=1", "train.sample_every=100000", "sample.steps=2", "sample.num=2", "train.warmup_steps=1"]

# Runs the real CLI, with checkpoint writes slowed down so a kill lands inside one.
SLOW_SAVE = """
import sys, time
import matryoshka.checkpoints as checkpoint
original = checkpoint.save_file
def slow_save(*args, **kwargs):
    original(*args, **kwargs)
    time.sleep(0.4)
checkpoint.save_file = slow_save
from matryoshka.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def start(run: Path, folder: Path, *extra: str, slow_save: bool = False) -> subprocess.Popen:
    program = ["-c", SLOW_SAVE] if slow_save else ["-m", "matryoshka.cli"]
    command = [
        sys.executable,
        *program,
        "train",
        "tiny",
        f"run_dir={run}",
        "data.source=imagefolder",
        f"data.path={folder}",
        *FAST,
        *extra,
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training ended early ({process.returncode}): {process.stderr.read()[-2000:]}")
        assert time.time() < deadline, "timed out waiting for training"
        time.sleep(0.05)


def train_tiny(run: Path, folder: Path, *overrides: str) -> int:
    """``mdm train tiny`` on the test folder with the fast settings; returns the exit status."""
    return main(
        ["train", "tiny", f"run_dir={run}", "data.source=imagefolder", f"data.path={folder}", *FAST, *overrides]
    )


def test_kill_9_during_checkpoint_write_leaves_a_resumable_run(tmp_path, folder):
    run = tmp_path / "run"
    process = start(run, folder, "train.steps=1000", "train.checkpoint_every=2", slow_save=True)
    try:
        root = run / "checkpoints"
        wait_for(lambda: len(list_checkpoints(run)) >= 1, process)
        wait_for(lambda: any(p.name.startswith(".tmp-") for p in root.iterdir()), process)
        process.kill()  # SIGKILL while a checkpoint directory is half written
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    partial = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert partial and not is_complete(partial[0])
    latest = latest_checkpoint(run)
    assert latest is not None and is_complete(latest)
    step = load_train_state(latest / "state.pt")["step"]
    load_pipeline(latest)  # weights load cleanly

    assert (
        main(
            [
                "train",
                "tiny",
                f"run_dir={run}",
                "data.source=imagefolder",
                f"data.path={folder}",
                *FAST,
                f"train.steps={step + 2}",
                "train.checkpoint_every=2",
            ]
        )
        == 0
    )
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())
    assert [m["step"] for m in metrics(run)] == list(range(1, step + 3))


def test_sigterm_saves_a_checkpoint_and_exits_promptly(tmp_path, folder):
    run = tmp_path / "run"
    process = start(run, folder, "train.steps=100000", "train.checkpoint_every=100000")
    try:
        wait_for(lambda: (run / "metrics.jsonl").exists() and len(metrics(run)) >= 3, process)
        sent = time.time()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 128 + signal.SIGTERM
    assert time.time() - sent < 60
    assert "SIGTERM" in process.stderr.read()
    latest = latest_checkpoint(run)
    assert load_train_state(latest / "state.pt")["step"] == metrics(run)[-1]["step"] >= 3


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_during_save_is_a_clear_error_and_keeps_the_previous_checkpoint(small_disk, folder, capsys):
    run = small_disk / "run"
    code = train_tiny(run, folder, "train.steps=50", "train.checkpoint_every=1", "train.keep_checkpoints=50")
    assert code == 4
    message = capsys.readouterr().err
    assert "could not save the checkpoint" in message and "No space left" in message and "is intact" in message
    latest = latest_checkpoint(run)
    assert latest is not None and is_complete(latest)
    load_pipeline(latest)
    assert not any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())


def test_crafted_pickle_is_refused_without_running_code(tmp_path, folder):
    run = tmp_path / "run"
    assert train_tiny(run, folder, "train.steps=2") == 0
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state = run / "checkpoints" / "step_00000002" / "state.pt"
    state.write_bytes(pickle.dumps({"step": 2, "payload": Exploit()}))
    with pytest.raises(CheckpointError, match="refusing or unable to read"):
        load_train_state(state)
    # Resuming reads state.pt (sampling no longer needs it): refused, and nothing is run.
    assert train_tiny(run, folder, "train.steps=3") == 2
    assert not marker.exists()


def test_non_finite_or_mismatched_weights_are_refused(tmp_path, folder):
    run = tmp_path / "run"
    assert train_tiny(run, folder, "train.steps=2") == 0
    weights = run / "checkpoints" / "step_00000002" / "ema.safetensors"
    tensors = load_tensors(weights)
    name = next(iter(tensors))
    save_file({**tensors, name: torch.full_like(tensors[name], float("nan"))}, weights)
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        load_pipeline(run)
    save_file({**tensors, name: torch.zeros(3, 3)}, weights)
    with pytest.raises(CheckpointError, match=rf"wrong shape.*{name}"):
        load_pipeline(run)
    weights.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_pipeline(run)


def test_empty_dataset_is_an_error_before_training(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "tiny", f"run_dir={tmp_path / 'run'}", "data.source=imagefolder", f"data.path={empty}"]) == 2
    assert str(empty) in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_divergence_skips_steps_then_stops_with_the_last_finite_weights(tmp_path, folder, monkeypatch):
    base = tiny()
    config = replace(
        base,
        run_dir=str(tmp_path / "run"),
        data=DataConfig(source="imagefolder", path=str(folder), resolution=16),
        train=replace(base.train, steps=100, max_nonfinite_steps=3, sample_every=1000, checkpoint_every=1000),
    )
    trainer = Trainer(config, quiet=True)
    real_loss = trainer.process.loss
    calls = {"n": 0}

    def flaky_loss(*args, **kwargs):
        calls["n"] += 1
        loss, logs = real_loss(*args, **kwargs)
        # Step 3 is a single bad step; from step 6 on the loss stays NaN.
        return (loss * float("nan"), logs) if calls["n"] == 3 or calls["n"] >= 6 else (loss, logs)

    monkeypatch.setattr(trainer.process, "loss", flaky_loss)
    snapshots = {}
    original_step = trainer._train_step

    def recording_step():
        result = original_step()
        snapshots[trainer.step] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        return result

    monkeypatch.setattr(trainer, "_train_step", recording_step)
    with pytest.raises(TrainingStopped, match="3 non-finite steps in a row") as stopped:
        trainer.train()
    assert stopped.value.exit_code == 3
    assert trainer.nonfinite_total == 4 and trainer.step == 8
    # snapshots[s] = weights after the step with index s; the step with index 2 was the single bad one.
    assert any(not torch.equal(snapshots[1][k], v) for k, v in snapshots[0].items())
    for key, value in snapshots[1].items():
        torch.testing.assert_close(snapshots[2][key], value, rtol=0, atol=0)
    saved = load_tensors(stopped.value.checkpoint / "model.safetensors")
    for key, value in snapshots[4].items():  # the checkpoint holds the weights from before the divergence
        torch.testing.assert_close(saved[key], value.cpu())
    assert [m["nonfinite_steps"] for m in metrics(Path(config.run_dir))][-1] == 4
