"""Hostile but realistic inputs to ``mdm train``: each is a clear refusal or the right behaviour."""

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from matryoshka.checkpoints import CheckpointError, latest_checkpoint, list_checkpoints, load_tensors, load_train_state
from matryoshka.cli.main import main
from matryoshka.config.presets import tiny
from matryoshka.config.run import RunConfig
from matryoshka.data.config import DataConfig
from matryoshka.data.imagefolder import ImageFolderDataset
from matryoshka.training.trainer import Trainer, TrainingStopped

from .test_cli import make_image_folder, metrics

FAST = ["train.log_every=1", "train.sample_every=100000", "sample.steps=2", "sample.num=2", "train.warmup_steps=1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def train(run: Path | str, folder: Path, *extra: str, config: str = "tiny") -> int:
    return main(["train", config, f"run_dir={run}", "data.source=imagefolder", f"data.path={folder}", *FAST, *extra])


def tiny_on(run: Path, folder: Path, **train) -> RunConfig:
    """The ``tiny`` preset on the test images, in ``run``, with these ``train`` settings."""
    base = tiny()
    return replace(
        base,
        run_dir=str(run),
        data=DataConfig(source="imagefolder", path=str(folder), resolution=16),
        train=replace(base.train, **train),
    )


def one_line_error(capsys) -> str:
    """The refusal: exactly one line on stderr, no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def steps_of(run: Path) -> list[int]:
    return [int(p.name.split("_")[1]) for p in list_checkpoints(run)]


# ---------------------------------------------------------------- 1. non-finite weights
@pytest.mark.parametrize("value", ["inf", ".nan", "-.inf", "2", "0"])
def test_non_finite_or_absurd_lr_is_refused(tmp_path, folder, capsys, value):
    assert train(tmp_path / "run", folder, f"train.lr={value}") == 2
    assert "lr" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_update_making_weights_non_finite_stops_and_keeps_the_good_checkpoint(tmp_path, folder, capsys):
    # weight_decay=1e300 passes validation (finite) but its decoupled decay overflows every weight.
    run = tmp_path / "run"
    assert train(run, folder, "train.steps=2", "train.keep_checkpoints=1") == 0
    good = load_tensors(run / "checkpoints" / "step_00000002" / "model.safetensors")
    capsys.readouterr()
    assert train(run, folder, "train.steps=4", "train.keep_checkpoints=1", "train.weight_decay=1e300") == 3
    err = capsys.readouterr().err
    assert "made the weights NaN/Inf" in err and "step_00000002 is intact" in err
    assert steps_of(run) == [2] and latest_checkpoint(run).name == "step_00000002"
    for name, value in load_tensors(run / "checkpoints" / "step_00000002" / "model.safetensors").items():
        assert torch.equal(value, good[name])
    # Lowering what caused it continues the run from the intact checkpoint.
    assert train(run, folder, "train.steps=4", "train.keep_checkpoints=1", "train.weight_decay=0") == 0
    assert steps_of(run) == [4]


def test_resume_takes_the_optimizer_settings_of_the_config_not_of_the_checkpoint(tmp_path, folder):
    config = tiny_on(tmp_path / "run", folder, steps=2, keep_checkpoints=1, sample_every=1000)
    Trainer(config, quiet=True).train()
    # A checkpoint as one saved before AdamW was fused, and before weight decay was changed.
    state_path = latest_checkpoint(config.run_dir) / "state.pt"
    state = torch.load(state_path, weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        group.update(fused=None, weight_decay=0.5, betas=[0.5, 0.5])
    torch.save(state, state_path)
    resumed = Trainer(replace(config, train=replace(config.train, steps=3, weight_decay=0.01)), quiet=True)
    assert resumed.resumed_from == latest_checkpoint(config.run_dir)
    for group in resumed.optimizer.param_groups:
        assert group["fused"] is True and group["weight_decay"] == 0.01 and group["betas"] == tuple(tiny().train.betas)


def test_save_never_writes_non_finite_weights(tmp_path, folder):
    config = tiny_on(tmp_path / "run", folder, steps=2, keep_checkpoints=1, sample_every=1000)
    trainer = Trainer(config, quiet=True)
    first = trainer.train()
    with torch.no_grad():
        next(trainer.ema.model.parameters()).fill_(float("nan"))
    trainer.step += 1
    with pytest.raises(TrainingStopped, match="refusing to save step 3: the EMA weights are NaN/Inf") as stopped:
        trainer.save()
    assert stopped.value.exit_code == 3 and stopped.value.checkpoint == first
    assert list_checkpoints(config.run_dir) == [first] and latest_checkpoint(config.run_dir) == first


def test_metrics_are_valid_json_when_the_loss_is_nan(tmp_path, folder, monkeypatch):
    config = tiny_on(tmp_path / "run", folder, steps=2, log_every=1, sample_every=1000)
    trainer = Trainer(config, quiet=True)
    real_loss = trainer.process.loss
    monkeypatch.setattr(trainer.process, "loss", lambda *a, **k: (real_loss(*a, **k)[0] * float("nan"), {}))
    trainer.train()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl")) for line in lines]
    assert records[-1]["loss"] is None and records[-1]["grad_norm"] is None and records[-1]["nonfinite_steps"] == 2


# ---------------------------------------------------------------- 2. one process per run directory
HOLD_LOCK = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}).encode())
print("locked", flush=True)
time.sleep(60)
"""


def test_second_training_process_on_a_run_is_refused(tmp_path, folder, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train(run, folder, "train.steps=2") == 2
        err = one_line_error(capsys)
        assert f"pid {holder.pid}" in err and "in use by another training process" in err
        assert not (run / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing anything: its lock is taken over.
    assert train(run, folder, "train.steps=2") == 0
    assert f"taking over the lock of pid {holder.pid}" in capsys.readouterr().out


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, folder, capsys):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "time": time.time()}))
    assert train(run, folder, "train.steps=2") == 0
    assert f"pid {dead.pid}" in capsys.readouterr().out
    assert (run / ".lock").read_text() == ""  # released: it names no holder


def test_locked_run_stops_every_torchrun_rank_with_the_message(tmp_path, folder):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--standalone",
            "-m",
            "matryoshka.cli",
            "train",
            "tiny",
            f"run_dir={run}",
            "data.source=imagefolder",
            f"data.path={folder}",
            "train.steps=2",
        ]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode != 0
    assert result.stderr.count(f"in use by another training process: pid {holder.pid}") == 2  # rank 0 and rank 1
    assert not (run / "checkpoints").exists()


# ---------------------------------------------------------------- 3. --resume RUN/checkpoints/step_N
def test_resume_from_a_checkpoint_goes_back_in_that_run(tmp_path, folder, capsys):
    run = tmp_path / "run"
    assert train(run, folder, "train.steps=4", "train.checkpoint_every=2") == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run / "checkpoints" / "step_00000002")]) == 0
    out = capsys.readouterr().out
    assert "going back to step_00000002" in out and "resuming" in out and "from step 2" in out
    assert not (run / "checkpoints" / "step_00000002" / "checkpoints").exists()  # no run nested in it
    assert steps_of(run) == [2, 4] and (run / "checkpoints" / "step_00000004.superseded").is_dir()
    assert latest_checkpoint(run).name == "step_00000004"
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4]
    superseded = [json.loads(line)["step"] for line in (run / "metrics.jsonl.superseded").read_text().splitlines()]
    assert superseded == [3, 4]


def test_resume_from_a_checkpoint_copied_out_of_its_run_is_refused(tmp_path, folder, capsys):
    run = tmp_path / "run"
    assert train(run, folder, "train.steps=2") == 0
    capsys.readouterr()
    copy = tmp_path / "copy"
    (run / "checkpoints" / "step_00000002").rename(copy)
    assert main(["train", "--resume", str(copy)]) == 2
    assert f"init_from={copy}" in one_line_error(capsys)


# ---------------------------------------------------------------- 4. a changed config on an existing run
def test_changed_yaml_on_an_existing_run_is_applied_and_listed(tmp_path, folder, capsys):
    run = tmp_path / "run"
    yaml = tmp_path / "run.yaml"
    text = (
        f"preset: tiny\nrun_dir: {run}\ndata: {{source: imagefolder, path: {folder}, resolution: 16}}\n"
        "train: {steps: 2, lr: 0.0003, sample_every: 100000, warmup_steps: 1}\nsample: {steps: 2, num: 2}\n"
    )
    yaml.write_text(text)
    assert main(["train", str(yaml)]) == 0
    yaml.write_text(text.replace("steps: 2, lr: 0.0003", "steps: 3, lr: 0.001"))
    capsys.readouterr()
    assert main(["train", str(yaml)]) == 0
    out = capsys.readouterr().out
    assert "train.lr: 0.0003 -> 0.001" in out and "train.steps: 2 -> 3" in out and "applied" in out
    assert load_train_state(latest_checkpoint(run) / "state.pt")["step"] == 3
    assert metrics(run)[-1]["lr"] == pytest.approx(0.001)

    yaml.write_text(text.replace("resolution: 16", "resolution: 32"))
    assert main(["train", str(yaml)]) == 2
    err = one_line_error(capsys)
    assert "data.resolution: 16 -> 32" in err and "cannot change in an existing run" in err


def test_other_preset_or_architecture_on_an_existing_run_is_refused(tmp_path, folder, capsys):
    run = tmp_path / "run"
    assert train(run, folder, "train.steps=2") == 0
    capsys.readouterr()
    assert train(run, folder, "train.steps=30", config="tiny-progressive") == 2
    assert "stages" in one_line_error(capsys)
    assert train(run, folder, "train.steps=3", "model.levels.0.channels=[16,48]") == 2
    assert "model.levels" in one_line_error(capsys)
    assert steps_of(run) == [2]
    # The same preset again without the overrides the run began with: they are not undone.
    assert main(["train", "tiny", f"run_dir={run}", "train.steps=3"]) == 0
    assert "settings changed from the saved" in capsys.readouterr().out
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]  # log_every=1 and the image folder as saved


# ---------------------------------------------------------------- 5. symlink loops
def test_symlink_loop_is_walked_once(tmp_path):
    root = make_image_folder(tmp_path / "images", count=4)
    (root / "cats" / "up").symlink_to("..")
    (root / "cats" / "again").symlink_to(root / "cats")
    (root / "dangling").symlink_to(tmp_path / "nothing")
    dataset = ImageFolderDataset(DataConfig(source="imagefolder", path=str(root), resolution=16, verify=False))
    assert sorted(item[0] for item in dataset.items) == [
        "cats/1.png",
        "cats/3.png",
        "dogs/0.png",
        "dogs/2.png",
        "dogs/broken.png",
    ]


# ---------------------------------------------------------------- 6. one-line errors
def test_run_dir_that_is_a_file_or_empty(tmp_path, folder, capsys):
    file = tmp_path / "file"
    file.write_text("x")
    assert train(file, folder) == 2
    assert "is a file, not a directory" in one_line_error(capsys)
    assert train("", folder) == 2
    assert "run_dir is empty" in one_line_error(capsys)
    assert train(" ", folder) == 2
    assert "run_dir is empty" in one_line_error(capsys)


def test_data_path_that_is_a_file(tmp_path, folder, capsys):
    file = folder / "cats" / "1.png"
    assert main(["train", "tiny", f"run_dir={tmp_path / 'run'}", "data.source=imagefolder", f"data.path={file}"]) == 2
    assert "is a file, not a folder of images" in one_line_error(capsys)


@pytest.fixture
def read_only_dir(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_run_dir_that_cannot_be_written(read_only_dir, folder, capsys):
    assert train(read_only_dir / "run", folder) == 2
    assert "cannot create run_dir" in one_line_error(capsys)
    assert train(read_only_dir, folder) == 2
    assert "cannot write in run_dir" in one_line_error(capsys)


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "xyz", "meta"])
def test_device_that_does_not_exist_here(tmp_path, folder, capsys, device):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the device")
    assert train(tmp_path / "run", folder, f"train.device={device}") == 2
    assert f"train.device={device!r}" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_absurd_sizes_are_refused_before_allocating(tmp_path, folder, capsys):
    assert train(tmp_path / "run", folder, "data.resolution=65536") == 2
    assert "beyond the supported 4096" in one_line_error(capsys)
    assert train(tmp_path / "run", folder, "model.levels.0.channels=[200000,200000]") == 2
    assert "G parameters" in one_line_error(capsys)


@pytest.mark.parametrize("nproc", ["0", "-2"])
def test_nproc_below_one(tmp_path, capsys, nproc):
    assert main(["train", "tiny", f"run_dir={tmp_path / 'run'}", "--nproc", nproc]) == 2
    assert "--nproc" in one_line_error(capsys)


def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, folder, capsys):
    run = tmp_path / "run"
    assert train(run, folder, "train.steps=4", "train.checkpoint_every=2") == 0
    latest = run / "checkpoints" / "step_00000004"
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, e.g. a copy cut short
    capsys.readouterr()
    assert train(run, folder, "train.steps=5", "train.checkpoint_every=2") == 0
    out = capsys.readouterr().out
    assert "step_00000004" in out and "Resuming from step_00000002, the newest intact checkpoint" in out
    assert (run / "checkpoints" / "step_00000004.damaged").is_dir()
    assert steps_of(run) == [2, 4, 5] and [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5]


def test_unreadable_training_state_never_advises_weights_only_false(tmp_path, folder, capsys):
    run = tmp_path / "run"
    assert train(run, folder, "train.steps=2") == 0
    # A global the safe reader refuses (a function, here harmless): PyTorch's message advises weights_only=False.
    torch.save({"step": 2, "x": os.getcwd}, run / "checkpoints" / "step_00000002" / "state.pt")
    capsys.readouterr()
    assert train(run, folder, "train.steps=3") == 2
    err = one_line_error(capsys)
    assert "no intact checkpoint" in err and "state.pt" in err and "weights_only" not in err
    with pytest.raises(CheckpointError) as error:
        load_train_state(run / "checkpoints" / "step_00000002.damaged" / "state.pt")
    assert "weights_only" not in str(error.value)


def test_foreign_training_state_is_refused(tmp_path, folder, capsys):
    run = tmp_path / "run"
    assert train(run, folder, "train.steps=2") == 0
    torch.save({"step": 2}, run / "checkpoints" / "step_00000002" / "state.pt")
    capsys.readouterr()
    assert main(["train", "--resume", str(run / "checkpoints" / "step_00000002")]) == 2
    assert "is not an mdm training state (no num_levels, optimizer, ema_updates)" in one_line_error(capsys)


# ---------------------------------------------------------------- further hostile inputs
@pytest.mark.parametrize(
    "override, named",
    [
        ("train.steps=-5", "steps"),
        ("train.batch_size=0", "batch_size"),
        ("train.keep_checkpoints=0", "keep_checkpoints"),
        ("train.max_nonfinite_steps=0", "max_nonfinite_steps"),
        ("train.min_lr_ratio=-1", "min_lr_ratio"),
        ("train.seed=-1", "seed"),
        ("train.max_minutes=.inf", "max_minutes"),
        ("train.grad_clip=.nan", "grad_clip"),
        ("stages=[{levels: 1, steps: 2}, {levels: 3}]", "stages"),
        ("diffusion.level_loss_weights=[1, .nan]", "level_loss_weights"),
        ("train.steps=1.5", "train.steps"),
        ("train=5", "train"),
    ],
)
def test_impossible_settings_are_refused_before_any_work(tmp_path, folder, capsys, override, named):
    assert train(tmp_path / "run", folder, override) == 2
    assert named in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_huge_num_workers_is_refused(tmp_path, folder, capsys):
    assert train(tmp_path / "run", folder, "data.num_workers=100000") == 2
    assert "data.num_workers=100000" in one_line_error(capsys)


def test_run_dir_inside_the_image_folder_is_refused(tmp_path, capsys):
    images = make_image_folder(tmp_path / "images", count=4)
    assert train(images / "runs" / "a", images) == 2
    assert "sample grids would become training images" in one_line_error(capsys)


def test_truncated_metrics_line_from_a_kill_does_not_stop_resume(tmp_path, folder):
    run = tmp_path / "run"
    assert train(run, folder, "train.steps=2") == 0
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "loss": 0.')  # killed in the middle of a write
    assert train(run, folder, "train.steps=3") == 0
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]


def test_fewer_steps_than_done_says_there_is_nothing_to_train(tmp_path, folder, capsys):
    run = tmp_path / "run"
    assert train(run, folder, "train.steps=2") == 0
    capsys.readouterr()
    assert train(run, folder, "train.steps=1") == 0
    out = capsys.readouterr().out
    assert "train.steps: 2 -> 1" in out and "nothing to train: the run is at step 2" in out
    assert steps_of(run) == [2]


def test_lock_file_names_this_process_while_training(tmp_path, folder, monkeypatch):
    run = tmp_path / "run"
    seen = {}
    original = Trainer.train

    def spy(self):
        seen.update(json.loads((run / ".lock").read_text()))
        return original(self)

    monkeypatch.setattr(Trainer, "train", spy)
    assert train(run, folder, "train.steps=1") == 0
    assert seen["pid"] == os.getpid() and seen["host"] == socket.gethostname()
