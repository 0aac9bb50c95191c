"""End to end through the real command line on the ``tiny`` preset."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from matryoshka.cli.main import main
from matryoshka.pipeline import load_pipeline
from matryoshka.utils.images import to_uint8

FAST = ["train.log_every=1", "train.sample_every=1000", "train.warmup_steps=3", "sample.steps=3", "sample.num=2"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def make_image_folder(root: Path, count: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for index in range(count):
        folder = root / ("cats" if index % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def train(run: Path, folder: Path, *extra: str) -> int:
    return main(
        [
            "train",
            "tiny",
            f"run_dir={run}",
            "data.source=imagefolder",
            f"data.path={folder}",
            "train.checkpoint_every=4",
            *FAST,
            *extra,
        ]
    )


def test_resumed_run_continues_the_same_loss_curve(tmp_path, folder):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(straight, folder, "train.steps=8") == 0
    assert train(resumed, folder, "train.steps=4") == 0
    assert train(resumed, folder, "train.steps=8") == 0  # same run_dir: resumes at step 4

    a, b = metrics(straight), metrics(resumed)
    assert [m["step"] for m in b] == list(range(1, 9))
    for key in ("loss", "lr", "loss/16x16", "loss/8x8"):
        np.testing.assert_allclose([m[key] for m in b], [m[key] for m in a], rtol=1e-5, err_msg=key)
    last = "checkpoints/step_00000008"
    for name in ("model.safetensors", "ema.safetensors"):
        for key, value in load_file(straight / last / name).items():
            torch.testing.assert_close(load_file(resumed / last / name)[key], value, rtol=1e-5, atol=1e-6)
    state = torch.load(resumed / last / "state.pt", weights_only=True)
    assert state["step"] == 8 and state["ema_updates"] == 8
    assert len(state["optimizer"]["state"]) > 0
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_00000008"


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_sample_every_level_with_each_sampler(tmp_path, folder, sampler, capsys):
    run = tmp_path / "run"
    assert train(run, folder, "train.steps=2") == 0
    out = tmp_path / "out"
    assert main(["sample", str(run), "--num", "3", "--steps", "4", "--sampler", sampler, "--out", str(out)]) == 0
    for side in (16, 8):
        files = sorted((out / f"{side}px").glob("*.png"))
        assert len(files) == 3
        assert Image.open(files[0]).size == (side, side)
        assert (out / f"grid_{side}px.png").is_file()
    assert str(out) in capsys.readouterr().out


def test_training_writes_outputs_and_reports_skipped_files(tmp_path, folder, capsys):
    run = tmp_path / "run"
    assert (
        train(
            run,
            folder,
            "train.steps=4",
            "train.sample_every=2",
            "eval.every=4",
            "eval.num=4",
            "eval.steps=2",
            "train.precision=fp32",
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "11 items" in printed or "12 items" in printed
    assert "1 skipped" in printed
    assert "device cpu, fp32" in printed  # the header names the precision train.precision resolved to
    assert "reached the last step" not in printed  # no time limit, so none cut short
    records = metrics(run)
    training = [r for r in records if "loss" in r]
    assert training[-1]["step"] == 4 and {"loss", "lr", "images_per_s", "loss/16x16", "loss/8x8"} <= set(training[-1])
    evaluation = [r for r in records if "fd_effnet-lite0/16x16" in r]
    assert [r["step"] for r in evaluation] == [4] and evaluation[0]["fd_effnet-lite0/8x8"] >= 0
    assert (run / "config.yaml").is_file() and (run / "tensorboard").is_dir()
    assert {p.name for p in (run / "samples").iterdir()} >= {"step_00000002_16px.png", "step_00000004_8px.png"}


def test_a_time_limited_run_that_runs_out_of_steps_says_so(tmp_path, folder, capsys):
    assert train(tmp_path / "run", folder, "train.steps=2", "train.max_minutes=30") == 0
    printed = capsys.readouterr().out
    assert "reached the last step (2) with" in printed and "train.max_minutes=30 left" in printed
    assert metrics(tmp_path / "run")[-1]["step"] == 2


def _pngs(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(path)) for path in sorted(folder.glob("*.png"))])


def test_class_conditional_training_and_sampling(tmp_path, folder):
    run = tmp_path / "run"
    assert (
        train(
            run,
            folder,
            "train.steps=3",
            "train.lr=0.01",
            "train.warmup_steps=1",
            "data.label=folder",
            "model.num_classes=2",
        )
        == 0
    )
    written = {}
    for name in ("cats", "dogs"):
        out = tmp_path / name
        assert (
            main(
                [
                    "sample",
                    str(run),
                    "--num",
                    "2",
                    "--steps",
                    "2",
                    "--class",
                    name,
                    "--guidance",
                    "3",
                    "--sampler",
                    "ddim",
                    "--seed",
                    "5",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        written[name] = _pngs(out / "16px")
    assert written["cats"].shape == (2, 16, 16, 3)
    # The label reaches the model: the same seed gives other images for another class,
    # and the CLI's images are the pipeline's for that class index (folders sort: cats=0, dogs=1).
    pipe = load_pipeline(run)
    # The training time behind the checkpoint travels with its weights (eval reports it).
    state = torch.load(run / "checkpoints" / "step_00000003" / "state.pt", weights_only=True)
    assert pipe.train_seconds == pytest.approx(state["train_seconds"], abs=1e-3) and pipe.train_seconds > 0
    for name, index in (("cats", 0), ("dogs", 1)):
        expected = pipe.generate(num=2, sampler="ddim", steps=2, guidance=3.0, seed=5, cond=pipe.condition(2, [index]))
        assert np.abs(to_uint8(expected[0]).astype(int) - written[name].astype(int)).max() <= 1
    assert np.abs(written["cats"].astype(int) - written["dogs"].astype(int)).max() > 2

    # Class names are saved with the run: sampling needs neither the training folder nor state.pt.
    alone = tmp_path / "alone"
    shutil.copytree(run / "checkpoints" / "step_00000003", alone)
    (alone / "state.pt").unlink()
    config = (alone / "config.yaml").read_text().replace(str(folder), str(tmp_path / "gone"))
    (alone / "config.yaml").write_text(config)
    assert (
        main(
            [
                "sample",
                str(alone),
                "--num",
                "2",
                "--steps",
                "2",
                "--class",
                "dogs",
                "--guidance",
                "3",
                "--sampler",
                "ddim",
                "--seed",
                "5",
                "--out",
                str(tmp_path / "alone-dogs"),
            ]
        )
        == 0
    )
    assert np.array_equal(_pngs(tmp_path / "alone-dogs" / "16px"), written["dogs"])


def test_bad_config_key_and_values_are_clear_errors(tmp_path, capsys):
    assert main(["train", "tiny", f"run_dir={tmp_path / 'r'}", "train.stpes=3"]) == 2
    assert "did you mean 'train.steps'" in capsys.readouterr().err
    assert main(["train", "tiny", f"run_dir={tmp_path / 'r'}", "train.lr=-1"]) == 2
    assert "lr" in capsys.readouterr().err
    assert main(["train", "tiny", f"run_dir={tmp_path / 'r'}", "data.resolution=18"]) == 2
    assert "resolution" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # rejected before any work
    assert main(["train", "no-such-preset"]) == 2
    assert "available presets" in capsys.readouterr().err


def test_presets_and_missing_run(capsys, tmp_path):
    assert main(["presets"]) == 0
    listed = capsys.readouterr().out
    assert "emoji64" in listed and "tiny" in listed
    assert main(["sample", str(tmp_path / "nothing")]) == 2
    assert "no such run" in capsys.readouterr().err
