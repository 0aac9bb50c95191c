"""`mdm eval` on video runs: per-frame metrics at every level and the temporal measures."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from matryoshka.cli.main import main
from matryoshka.config.presets import tiny_video
from matryoshka.data import DataConfig, build_dataset
from matryoshka.diffusion.process import MatryoshkaDiffusion
from matryoshka.diffusion.schedules import squaredcos
from matryoshka.evaluation import ReferenceStats, run_evaluation
from matryoshka.evaluation.errors import EvaluationError
from matryoshka.evaluation.video import ClipLayout, TemporalStats, frames_of, pool_clip_levels
from matryoshka.pipeline import Pipeline, load_pipeline

from .test_evaluation_cli import make_folder, make_run, save_untrained


def mdm(*argv) -> int:
    return main([str(a) for a in argv])


def make_video_run(run: Path) -> Path:
    """An untrained tiny-video checkpoint (4 frames at 16² around 2 frames at 8²): no training needed."""
    return save_untrained(run, replace(tiny_video(), run_dir=str(run)), step=5)


@pytest.fixture(scope="module")
def video_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("video-eval")
    clips = root / "clips"  # six emoji-motion clips as mp4s: a reference folder of videos
    assert mdm("data", "emoji-motion", "--out", clips, "--size", 16, "--frames", 4, "--count", 6) == 0
    return root, clips, make_video_run(root / "run")


# ----- the pieces, against closed forms ----------------------------------------------------


def test_temporal_measures_closed_forms():
    static = torch.rand(2, 3, 1, 8, 8).repeat(1, 1, 4, 1, 1) * 2 - 1
    flicker = torch.tensor([-1.0, 1.0, -1.0, 1.0]).view(1, 1, 4, 1, 1).expand(1, 3, 4, 8, 8)
    ramp = (torch.arange(4.0) * 20 / 127.5 - 1).view(1, 1, 4, 1, 1).expand(1, 3, 4, 8, 8)  # +20 levels a frame
    stats = TemporalStats(4)
    stats.update(static, np.tile(np.random.default_rng(0).normal(size=(2, 1, 5)), (1, 4, 1)).reshape(8, 5))
    assert stats.frame_diff == 0 and stats.frame_dist == pytest.approx(0, abs=1e-12)
    for clip, expected in ((flicker, 1.0), (ramp, 20 / 255)):
        one = TemporalStats(4)
        one.update(clip)
        assert one.frame_diff == pytest.approx(expected, rel=1e-6)
    orthogonal = TemporalStats(4)
    orthogonal.update(flicker, np.eye(4, 6))  # consecutive frames' features at right angles: 1 - cos = 1
    assert orthogonal.frame_dist == pytest.approx(1.0)
    assert TemporalStats(1).frame_diff is None  # a one-frame level has no temporal measure


def test_reference_clips_are_pooled_as_the_process_pools_them():
    process = MatryoshkaDiffusion(squaredcos(), num_levels=3, factor=2, frames=[8, 4, 1])
    clips = torch.randn(2, 3, 8, 16, 16)
    pooled = pool_clip_levels(clips, [16, 8, 4], ClipLayout(8, (8, 4, 1)))
    for got, want in zip(pooled, process.pyramid(clips)):
        torch.testing.assert_close(got, want)
    assert frames_of(clips)[9].equal(clips[1, :, 1])  # clip by clip: row 9 is clip 1's frame 1


# ----- end to end --------------------------------------------------------------------------


def reference_clips(folder: Path) -> torch.Tensor:
    dataset = build_dataset(DataConfig(source="videofolder", path=str(folder), resolution=16, frames=4))
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def generate_these(monkeypatch, clips: torch.Tensor) -> None:
    """Make the pipeline 'generate' ``clips`` in order (each level: the process's pyramid of them)."""
    served = []

    def generate(self, num, **_):
        start = sum(served)
        served.append(num)
        return self.process.pyramid(clips[start : start + num])

    monkeypatch.setattr(Pipeline, "generate", generate)


def test_identical_clips_give_zero_fd_and_the_reference_temporal_measures(video_setup, monkeypatch):
    _root, folder, run = video_setup
    clips = reference_clips(folder)
    generate_these(monkeypatch, clips)
    pipeline = load_pipeline(run, device="cpu")
    report = run_evaluation(pipeline, str(folder), num=6, metrics="fd,temporal", feature="effnet-lite0", batch_size=4)
    metrics = report["metrics"]
    assert report["levels"] == ["4x16x16", "2x8x8"] and report["video"]["level_frames"] == [4, 2]
    for level in report["levels"]:
        assert metrics[f"fd_effnet-lite0/{level}"] == pytest.approx(0, abs=1e-3)
        assert metrics[f"frame_diff/{level}"] == pytest.approx(metrics[f"frame_diff_ref/{level}"], rel=1e-6)
        assert metrics[f"frame_dist_effnet-lite0/{level}"] == pytest.approx(
            metrics[f"frame_dist_ref_effnet-lite0/{level}"], rel=1e-4
        )
    # the top level's reference value, by hand: consecutive 8-bit frames, |difference| / 255
    pixels = ((clips.clamp(-1, 1) + 1) * 127.5).round()
    by_hand = (pixels[:, :, 1:] - pixels[:, :, :-1]).abs().mean().item() / 255
    assert metrics["frame_diff_ref/4x16x16"] == pytest.approx(by_hand, rel=1e-6) and by_hand > 0.005
    assert report["reference"]["count"] == {"4x16x16": 24, "2x8x8": 12}  # frames: 6 clips x 4, x 2

    # static clips (every frame the clip's first): no change from frame to frame at all
    generate_these(monkeypatch, clips[:, :, :1].repeat(1, 1, 4, 1, 1))
    still = run_evaluation(pipeline, str(folder), num=6, metrics="temporal", feature="effnet-lite0")["metrics"]
    for level in report["levels"]:
        assert still[f"frame_diff/{level}"] == 0
        assert still[f"frame_dist_effnet-lite0/{level}"] == pytest.approx(0, abs=1e-6)
        assert still[f"frame_diff_ref/{level}"] == metrics[f"frame_diff_ref/{level}"]


def test_eval_stats_and_eval_on_a_video_run(video_setup, capsys):
    root, _folder, run = video_setup
    stats_path = root / "motion.npz"
    argv = ["eval-stats", "emoji-motion", "--run", run, "--out", stats_path, "--max-images", 8]
    assert mdm(*argv, "--feature", "effnet-lite0", "--quiet") == 0
    assert "8 clips from emoji-motion, levels 4x16x16, 2x8x8" in capsys.readouterr().out
    stats = ReferenceStats.load(stats_path)
    assert stats.clip_frames == 4 and [stats.levels[s].temporal.frames for s in (16, 8)] == [4, 2]
    assert stats.levels[16].count == 32 and stats.levels[8].features.shape == (16, 1280)

    report_path = root / "report.json"
    argv = ["eval", run, "--reference", stats_path, "--num", 4, "--steps", 2, "--batch-size", 2]
    assert mdm(*argv, "--out", report_path, "--kid-subsets", 5, "--quiet") == 0  # default metrics: + temporal
    printed = capsys.readouterr().out
    assert "frame_diff_ref" in printed and "not FVD" in printed
    report = json.loads(report_path.read_text())
    assert not any("fvd" in key.lower() for key in report["metrics"])
    names = ["fd", "kid", "kid_std", "precision", "recall", "frame_dist", "frame_dist_ref"]
    keys = {f"{name}_effnet-lite0" for name in names} | {"frame_diff", "frame_diff_ref"}
    assert set(report["metrics"]) == {f"{key}/{level}" for key in keys for level in ("4x16x16", "2x8x8")}
    assert all(np.isfinite(value) for value in report["metrics"].values())
    cached = np.load(next(Path(report["cache"]).glob("batch_*.npz")))
    assert cached["level_16"].shape == (2, 3, 4, 16, 16) and cached["level_8"].shape == (2, 3, 2, 8, 8)


def test_video_evaluation_explains_bad_inputs(video_setup, capsys, tmp_path):
    root, _folder, run = video_setup
    image_run = make_run(tmp_path / "image-run", make_folder(tmp_path / "images", count=4, side=16))
    common = ["--num", 2, "--steps", 1, "--no-cache", "--quiet", "--feature", "effnet-lite0"]
    # image statistics for a video model, and the reverse
    image_stats = tmp_path / "images.npz"
    assert mdm("eval-stats", tmp_path / "images", "--run", image_run, "--out", image_stats, "--quiet") == 0
    assert mdm("eval", run, "--reference", image_stats, "--metrics", "fd", *common) == 2
    assert "hold images, the model makes clips of 4 frames" in capsys.readouterr().err
    video_stats = root / "motion2.npz"
    assert mdm("eval-stats", "emoji-motion", "--run", run, "--out", video_stats, "--max-images", 2, "--quiet") == 0
    with pytest.raises(EvaluationError, match=r"hold clips of 4 frames .* makes clips of 8 frames"):
        ReferenceStats.load(video_stats).check_compatible(_effnet(), [16, 8], 16, ClipLayout(8, (8, 4)))
    # an image model measured against the emoji-motion clips, or asked for temporal measures
    assert mdm("eval", image_run, "--reference", "emoji-motion", "--metrics", "fd", *common) == 2
    assert "measures video models only" in capsys.readouterr().err
    assert mdm("eval", image_run, "--reference", image_stats, "--metrics", "temporal", *common) == 2
    assert "temporal needs a video model" in capsys.readouterr().err
    assert mdm("eval", image_run, "--reference", tmp_path / "images", "--metrics", "fvd", *common) == 2
    assert "fvd needs a video model" in capsys.readouterr().err
    assert mdm("eval", run, "--reference", "emoji", "--metrics", "fd", *common) == 2
    assert "reference 'emoji' holds images" in capsys.readouterr().err
    assert mdm("eval-stats", "emoji-motion", "--run", run, "--out", tmp_path / "x.npz", "--levels", "16") == 2
    assert "leave out --resolution/--levels" in capsys.readouterr().err


def _effnet():
    from matryoshka.evaluation import build_feature_extractor

    return build_feature_extractor("effnet-lite0")


def test_clip_score_of_a_clip_is_the_mean_over_its_frames(video_setup, monkeypatch):
    from matryoshka.evaluation.features import images_to_uint8, uint8_to_images

    from .test_evaluation_cli import tiny_clip_scorer

    _root, folder, run = video_setup
    clips = reference_clips(folder)[:4]
    generate_these(monkeypatch, clips)
    pipeline = load_pipeline(run, device="cpu")
    scorer = tiny_clip_scorer()
    report = run_evaluation(pipeline, None, num=4, metrics="clip", clip_model=scorer, clip_prompt="an emoji moving")
    for level, name in zip(pipeline.process.pyramid(clips), ("4x16x16", "2x8x8")):
        images = uint8_to_images(images_to_uint8(frames_of(level)))  # the frames as the cache holds them
        expected = scorer.scores(images, ["an emoji moving"] * len(images)).mean()
        assert report["metrics"][f"clip_score_tiny-clip/{name}"] == pytest.approx(float(expected), rel=1e-5)
