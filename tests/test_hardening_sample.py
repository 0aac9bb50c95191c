"""Hostile inputs to `mdm sample` and the CLI-wide rule: one error line, never a traceback, nothing mixed up."""

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from matryoshka.checkpoints import CheckpointError
from matryoshka.cli.errors import one_line
from matryoshka.cli.main import main
from matryoshka.pipeline import Pipeline

from .test_cli import make_image_folder, train


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hardening")
    run = root / "run"
    assert train(run, make_image_folder(root / "images"), "train.steps=2") == 0
    return run


def pngs(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(path)) for path in sorted(folder.glob("*.png"))])


@pytest.mark.parametrize(
    "bad",
    [
        ["--num", "0"],
        ["--num", "-3"],
        ["--steps", "0"],
        ["--guidance", "nan"],
        ["--guidance", "inf"],
        ["--guidance", "-1"],
        ["--batch-size", "0"],
        ["--seed", "-1"],
    ],
)
def test_zero_negative_and_non_finite_values_are_refused(run, tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", str(run), *bad, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert bad[0] in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_each_sampling_gets_its_own_folder_with_its_settings(run, capsys):
    assert main(["sample", str(run), "--num", "2", "--steps", "2", "--seed", "1"]) == 0
    assert main(["sample", str(run), "--num", "2", "--steps", "2", "--seed", "2", "--sampler", "ddim"]) == 0
    folders = sorted((run / "samples").glob("sample_*"))
    assert [f.name for f in folders] == ["sample_00000002_001", "sample_00000002_002"]
    first, second = (json.loads((f / "settings.json").read_text()) for f in folders)
    assert (first["seed"], second["seed"], second["sampler"]) == (1, 2, "ddim")
    assert len(list((folders[0] / "16px").glob("*.png"))) == 2


def test_out_must_be_a_new_or_empty_folder(run, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "0000.png").write_bytes(b"earlier work")
    assert main(["sample", str(run), "--num", "1", "--steps", "1", "--out", str(taken)]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert (taken / "0000.png").read_bytes() == b"earlier work"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["sample", str(run), "--num", "1", "--steps", "1", "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_batches_are_streamed_and_the_settings_reproduce_the_images(run, tmp_path):
    out = tmp_path / "many"
    assert (
        main(["sample", str(run), "--num", "5", "--steps", "2", "--batch-size", "2", "--seed", "7", "--out", str(out)])
        == 0
    )
    assert len(list((out / "16px").glob("*.png"))) == 5 and len(list((out / "8px").glob("*.png"))) == 5
    # The first batch does not depend on how many images follow it.
    few = tmp_path / "few"
    assert (
        main(["sample", str(run), "--num", "2", "--steps", "2", "--batch-size", "2", "--seed", "7", "--out", str(few)])
        == 0
    )
    assert np.array_equal(pngs(few / "16px"), pngs(out / "16px")[:2])
    command = shlex.split(json.loads((out / "settings.json").read_text())["command"])
    assert command[:2] == ["mdm", "sample"]
    again = tmp_path / "again"
    assert main([*command[1:], "--out", str(again)]) == 0
    assert np.array_equal(pngs(again / "16px"), pngs(out / "16px"))


@pytest.mark.parametrize("eta,recorded,flag", [("1.5", 1.5, "1.5"), ("[1.5,0.5]", [1.5, 0.5], "1.5,0.5")])
def test_the_settings_name_the_noise_of_a_stochastic_run(tmp_path, eta, recorded, flag):
    """A run that samples with DDIM noise by default (as emoji64) records it, and its command makes the same images."""
    run = tmp_path / "run"
    stochastic = ("train.steps=1", "sample.sampler=ddim", f"sample.eta={eta}")
    assert train(run, make_image_folder(tmp_path / "images"), *stochastic) == 0
    out = tmp_path / "out"
    assert main(["sample", str(run), "--num", "2", "--steps", "3", "--out", str(out)]) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert (settings["sampler"], settings["eta"]) == ("ddim", recorded)
    command = shlex.split(settings["command"])
    assert command[command.index("--eta") + 1] == flag
    again = tmp_path / "again"
    assert main([*command[1:], "--out", str(again)]) == 0
    assert np.array_equal(pngs(again / "16px"), pngs(out / "16px"))


def test_ctrl_c_is_one_line_and_keeps_what_was_written(run, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Pipeline, "generate", interrupted)
    assert main(["sample", str(run), "--num", "1", "--out", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


def test_a_bug_is_an_internal_error_with_its_traceback(run, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("unexpected")

    monkeypatch.setattr(Pipeline, "generate", broken)
    assert main(["sample", str(run), "--num", "1", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "internal error" in err


def test_error_lines_never_advise_unpickling_untrusted_files():
    error = CheckpointError(
        "cannot read state.pt: Weights only load failed.\n(1) In PyTorch 2.6, we changed the "
        "default value of the `weights_only` argument\nre-running `torch.load` with "
        "`weights_only=False` will likely succeed"
    )
    assert "weights_only" not in one_line(error) and "cannot read state.pt" in one_line(error)


def test_eval_refuses_a_folder_as_report_before_sampling(run, tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("sampled before checking --out")

    monkeypatch.setattr(Pipeline, "generate", never)
    assert main(["eval", str(run), "--reference", "train", "--num", "4", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_eval_reports_of_other_references_or_metrics_do_not_overwrite_each_other(run, tmp_path, capsys):
    images = make_image_folder(tmp_path / "other")
    common = ["eval", str(run), "--num", "4", "--steps", "1", "--batch-size", "4", "--feature", "effnet-lite0"]
    assert main([*common, "--reference", "train", "--metrics", "fd"]) == 0
    assert main([*common, "--reference", str(images), "--metrics", "fd"]) == 0
    assert main([*common, "--reference", "train", "--metrics", "fd,kid", "--kid-subset-size", "2"]) == 0
    reports = sorted((run / "eval").glob("*.json"))
    assert len(reports) == 3
    assert "only 4 generated samples" in capsys.readouterr().out  # FD from 4 images comes with a warning


def test_data_export_needs_a_new_or_empty_folder(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    assert main(["data", "emoji", "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "keep me"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.png").write_bytes(b"x")
    assert main(["data", "emoji", "--out", str(tmp_path / "full")]) == 2
    assert "already holds files" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "xyz"], "unknown device 'xyz'"),
        (["--device", "cuda:7"], "cuda:7"),
        (["--class", "0"], "not class-conditional"),
        (["--steps", "5000"], "has 1000 steps"),
        (["--negative-prompt", "blurry"], "needs a text-to-image model"),
        (["--prompt", "a cat"], "no text conditioning"),
    ],
)
def test_impossible_requests_are_refused_before_anything_is_written(run, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["sample", str(run), "--num", "1", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_unreadable_prompt_file_and_file_paths_where_folders_belong(run, tmp_path, capsys):
    binary = tmp_path / "prompts.txt"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    assert main(["sample", str(run), "--prompt-file", str(binary)]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["eval", str(run), "--reference", "train", "--num", "4", "--cache", str(a_file / "cache")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["eval-stats", "emoji", "--out", str(a_file / "stats.npz")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(run), "--port", "99999"])
    assert exit_info.value.code == 2 and "1..65535" in capsys.readouterr().err
