"""FVD: the I3D file is recognised by its content, clips reach it as StyleGAN-V feeds them, and
``mdm eval --metrics fvd`` reports a Fréchet distance of its features at every video level."""

import json
import subprocess
import warnings

import numpy as np
import pytest
import torch

from matryoshka.cli.main import main
from matryoshka.config.presets import load_run_config
from matryoshka.evaluation import fvd as fvd_module
from matryoshka.evaluation.errors import EvaluationError
from matryoshka.evaluation.fvd import FVDMeter, I3DFeatures, git_blob_id, stretch_frames
from matryoshka.evaluation.stats import frechet_distance_of
from matryoshka.evaluation.video import ClipLayout

FAST = ["train.log_every=1", "train.sample_every=1000", "train.warmup_steps=1", "sample.steps=2", "sample.num=2"]


class StandInI3D(torch.nn.Module):
    """The I3D's calling convention with closed-form features: per-channel mean, spread and motion."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False):
        if rescale:
            x = x / 127.5 - 1
        motion = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(2, 3, 4))
        return torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4)), motion], dim=1)


@pytest.fixture
def stand_in(tmp_path):
    path = tmp_path / "i3d_torchscript.pt"
    with warnings.catch_warnings():  # TorchScript is deprecated, but the published I3D is TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(StandInI3D()).save(str(path))
    return path


def test_the_file_is_checked_by_its_git_blob_id(stand_in):
    assert git_blob_id(stand_in) == subprocess.check_output(["git", "hash-object", str(stand_in)], text=True).strip()
    with pytest.raises(EvaluationError, match=f"git blob id is {git_blob_id(stand_in)}.*{fvd_module.I3D_GIT_BLOB}"):
        I3DFeatures(stand_in)
    with pytest.raises(FileNotFoundError, match="no such file"):
        I3DFeatures(stand_in.parent / "missing.pt")


def test_clips_reach_the_network_as_8_bit_values_stretched_to_16_frames(stand_in):
    clips = torch.rand(3, 3, 4, 8, 8) * 2 - 1
    stretched = stretch_frames(clips)
    assert stretched.shape[2] == 16 and all(torch.equal(stretched[:, :, f], clips[:, :, f // 4]) for f in range(16))
    assert torch.equal(stretch_frames(torch.zeros(1, 3, 20, 4, 4)), torch.zeros(1, 3, 20, 4, 4))
    features = I3DFeatures(stand_in, expected_blob=git_blob_id(stand_in))(clips)
    pixels = ((stretched + 1) * 127.5).round()
    want = StandInI3D()(pixels, rescale=True).double().numpy()
    np.testing.assert_allclose(features, want, rtol=1e-6)
    # the 12 repeated frame pairs add no motion: motion is 3/15 of the 4-frame clip's
    np.testing.assert_allclose(
        features[:, 6:], StandInI3D()(pixels[:, :, ::4], rescale=True)[:, 6:].numpy() * 3 / 15, rtol=1e-5
    )


def test_meter_gives_zero_for_the_reference_itself_and_the_frechet_distance_otherwise(stand_in):
    from matryoshka.data import DataConfig
    from matryoshka.data.emoji_motion import EmojiMotionDataset
    from matryoshka.evaluation.reference import dataset_batches, pick_subset

    network = I3DFeatures(stand_in, expected_blob=git_blob_id(stand_in))
    layout = ClipLayout(4, (4, 2))
    dataset = EmojiMotionDataset(DataConfig(source="emoji-motion", resolution=16, frames=4, shuffle=False))
    meter = FVDMeter(network, [16, 8], layout)
    meter.add_reference(dataset, max_clips=12, batch_size=5)
    assert meter.real[16].count == meter.real[8].count == 12
    (top, inner), *_ = dataset_batches(dataset, pick_subset(len(dataset), 12), [16, 8], 12, layout=layout)
    meter.add_generated(16, top)
    meter.add_generated(8, inner)
    names = {16: "4x16x16", 8: "2x8x8"}
    assert meter.results(names) == pytest.approx({"fvd/4x16x16": 0, "fvd/2x8x8": 0}, abs=1e-6)
    assert meter.describe(names)["clips"] == meter.describe(names)["reference_clips"] == {"4x16x16": 12, "2x8x8": 12}
    assert meter.describe(names)["stretched_from_frames"] == {"4x16x16": 4, "2x8x8": 2}
    assert meter.warnings() == []  # 12 clips on each side, 9 features

    noise = torch.rand(12, 3, 2, 8, 8) * 2 - 1
    other = FVDMeter(network, [16, 8], layout)
    other.real, other.generated[16] = meter.real, meter.generated[16]
    other.add_generated(8, noise)
    value = other.results(names)["fvd/2x8x8"]
    assert value == pytest.approx(frechet_distance_of(network(inner), network(noise)), rel=1e-6) and value > 0.1


def test_mdm_eval_reports_fvd_at_every_video_level(tmp_path, stand_in, monkeypatch, capsys):
    run = tmp_path / "video"
    assert main(["train", "tiny-video", f"run_dir={run}", "train.steps=1", *FAST]) == 0
    args = ["eval", str(run), "--reference", "emoji-motion", "--num", "4", "--steps", "2", "--no-cache", "--quiet"]
    args += ["--max-reference-images", "8", "--metrics", "fvd", "--i3d-weights", str(stand_in)]
    assert main([*args, "--out", str(tmp_path / "refused.json")]) != 0
    assert "git blob id" in capsys.readouterr().err and not (tmp_path / "refused.json").exists()
    monkeypatch.setattr(fvd_module, "I3D_GIT_BLOB", git_blob_id(stand_in))
    assert main([*args, "--out", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["metrics"]) == {"fvd/4x16x16", "fvd/2x8x8"}
    assert all(np.isfinite(v) and v > 0 for v in report["metrics"].values())
    assert report["fvd"]["name"] == "i3d" and report["fvd"]["frames"] == 16
    assert report["fvd"]["clips"] == {"4x16x16": 4, "2x8x8": 4}
    assert report["fvd"]["reference_clips"] == {"4x16x16": 8, "2x8x8": 8}
    assert any("FVD from 4 clips" in warning for warning in report["warnings"])
    assert main(["eval", str(run), "--reference", "emoji-motion", "--metrics", "fvd", "--num", "2", "--no-cache"]) != 0
    assert "--i3d-weights" in capsys.readouterr().err
    with pytest.raises(ValueError, match="fvd is not measured during training"):
        load_run_config("tiny-video", ["eval.every=10", "eval.metrics=[fd,fvd]"])
