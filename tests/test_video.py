"""Video: the space-time pyramid, temporal layers, inflation, video data and the video run end to end."""

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from matryoshka.cli.main import main
from matryoshka.config.presets import load_run_config
from matryoshka.data import DataConfig, DataConfigError, build_dataset
from matryoshka.data.emoji_motion import MOTIONS, EmojiMotionDataset
from matryoshka.diffusion import get_sampler
from matryoshka.diffusion.process import MatryoshkaDiffusion
from matryoshka.diffusion.schedules import squaredcos
from matryoshka.models import ModelConfig, NestedUNet
from matryoshka.models.presets import tiny, tiny_video
from matryoshka.models.temporal import fold_frames, frame_places, is_temporal_parameter
from matryoshka.pipeline import load_pipeline
from matryoshka.training.state import init_inner_from
from matryoshka.utils.video import write_gif, write_mp4

FAST = ["train.log_every=1", "train.sample_every=1000", "train.warmup_steps=1", "sample.steps=2", "sample.num=2"]


def randomize(model: torch.nn.Module, seed: int = 0, only=lambda name: True) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if only(name):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model


def video_of(config: ModelConfig, frames: list[int], temporal: bool = True, frame_embedding=False) -> ModelConfig:
    levels = [replace(level, temporal=temporal, frame_embedding=frame_embedding) for level in config.levels]
    return replace(config, levels=levels, frames=frames)


def decoded(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


# ----- the space-time pyramid ---------------------------------------------------------------


def test_spacetime_pyramid_subsamples_frames_and_pools_space():
    process = MatryoshkaDiffusion(squaredcos(), num_levels=3, factor=2, frames=[8, 4, 1])
    clip = torch.randn(2, 3, 8, 16, 16)
    levels = process.pyramid(clip)
    assert [tuple(level.shape) for level in levels] == [(2, 3, 8, 16, 16), (2, 3, 4, 8, 8), (2, 3, 1, 4, 4)]
    # Closed form: level r keeps frames 0, k, 2k... of the clip (k = 8 / F_r), each mean-pooled over s x s blocks.
    for level, (frames, side) in enumerate([(4, 8), (1, 4)], start=1):
        stride, block = 8 // frames, 16 // side
        kept = clip[:, :, ::stride]
        expected = kept.reshape(2, 3, frames, side, block, side, block).mean(dim=(4, 6))
        torch.testing.assert_close(levels[level], expected)
    assert [process.frame_stride(i) for i in range(3)] == [2, 4, 1]
    noise = process.initial_noise(5, 3, 16)
    assert [tuple(n.shape) for n in noise] == [(5, 3, 8, 16, 16), (5, 3, 4, 8, 8), (5, 3, 1, 4, 4)]
    with pytest.raises(ValueError, match="expected clips"):
        process.pyramid(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="multiple"):
        MatryoshkaDiffusion(squaredcos(), num_levels=2, factor=2, frames=[6, 4])


@pytest.mark.parametrize("power", [1.0, 2.0])
@pytest.mark.parametrize("temporal_shift", [False, True])
def test_spacetime_shift_against_closed_form(power, temporal_shift):
    base = squaredcos()
    process = MatryoshkaDiffusion(
        base, num_levels=3, factor=4, shift_power=power, frames=[16, 4, 1], temporal_shift=temporal_shift
    )
    t = torch.arange(1, 1000)
    for level, (side_ratio, frame_ratio) in enumerate([(16, 16), (4, 4), (1, 1)]):
        # logSNR_r = logSNR - p ln(s_r), s_r = side ratio (x sqrt(frame ratio) when frames count).
        ratio = side_ratio * math.sqrt(frame_ratio) if temporal_shift else side_ratio
        expected = base.log_snr(t) - power * math.log(ratio)
        torch.testing.assert_close(process.schedule_for_level(level).log_snr(t), expected, rtol=1e-6, atol=1e-5)
        assert process.shift_ratio(level) == pytest.approx(ratio)


def test_image_process_is_unchanged_by_the_video_options():
    image = MatryoshkaDiffusion(squaredcos(), num_levels=2, factor=4)
    video = MatryoshkaDiffusion(squaredcos(), num_levels=2, factor=4, frames=[1, 1], temporal_shift=True)
    t = torch.arange(1, 1001)
    for level in range(2):
        assert torch.equal(image.schedule_for_level(level).log_snr(t), video.schedule_for_level(level).log_snr(t))


# ----- the model ----------------------------------------------------------------------------


@pytest.mark.parametrize("frame_embedding", [False, True])
def test_inflated_model_is_the_image_model_per_frame_exactly(frame_embedding):
    image = randomize(NestedUNet(tiny(2)))
    video = NestedUNet(video_of(tiny(2), [4, 4], frame_embedding=frame_embedding))
    missing, unexpected = video.load_state_dict(image.state_dict(), strict=False)
    assert not unexpected and missing and all(is_temporal_parameter(name) for name in missing)
    generator = torch.Generator().manual_seed(1)
    z = [torch.randn(2, 3, 4, 16, 16, generator=generator), torch.randn(2, 3, 4, 8, 8, generator=generator)]
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        out = video(z, t)
        per_frame = image([fold_frames(level) for level in z], t.repeat_interleave(4))
    for got, want in zip(out, per_frame):
        assert torch.equal(fold_frames(got), want)


def test_an_image_is_a_one_frame_clip():
    """Joint image and video data: a video model given one-frame clips skips its temporal layers."""
    image = randomize(NestedUNet(tiny(2)))
    video = randomize(NestedUNet(video_of(tiny(2), [2, 4], frame_embedding=True)), seed=5)
    video.load_state_dict(image.state_dict(), strict=False)  # temporal layers keep their (non-zero) values
    z = [torch.randn(3, 3, 16, 16), torch.randn(3, 3, 8, 8)]
    t = torch.tensor([1.0, 300.0, 999.0])
    with torch.no_grad():
        out = video([level[:, :, None] for level in z], t)
        want = image(z, t)
    for got, expected in zip(out, want):
        assert torch.equal(got[:, :, 0], expected)


@pytest.mark.parametrize("temporal", [True, False])
def test_temporal_layers_mix_frames_once_trained(temporal):
    model = randomize(NestedUNet(video_of(tiny(2), [4, 4], temporal)))
    generator = torch.Generator().manual_seed(2)
    z = [torch.randn(1, 3, 4, 16, 16, generator=generator), torch.randn(1, 3, 4, 8, 8, generator=generator)]
    changed = [level.clone() for level in z]
    changed[0][:, :, 3] += 1.0
    t = torch.tensor([100.0])
    with torch.no_grad():
        before, after = model(z, t)[0], model(changed, t)[0]
    assert not torch.equal(before[:, :, 3], after[:, :, 3])
    # Frame 0 sees frame 3 only through temporal layers; a spatial-only model keeps frames independent.
    assert torch.equal(before[:, :, 0], after[:, :, 0]) != temporal


@pytest.mark.parametrize("frame_embedding", [False, True])
def test_frame_embedding_tells_identical_frames_apart(frame_embedding):
    """Spatial-only levels: identical frames give identical outputs unless the frame's place is embedded."""
    model = randomize(NestedUNet(video_of(tiny(2), [2, 4], temporal=False, frame_embedding=frame_embedding)))
    generator = torch.Generator().manual_seed(3)
    z = [torch.randn(2, 3, 1, 16, 16, generator=generator).expand(-1, -1, 4, -1, -1)]
    z.append(torch.randn(2, 3, 1, 8, 8, generator=generator).expand(-1, -1, 2, -1, -1))
    t = torch.tensor([300.0, 40.0])
    with torch.no_grad():
        out = model(z, t)
        alone = model([level[1:] for level in z], t[1:])
        top_for_first_only = model([z[0][:1], z[1]], t)  # mixed-resolution batch: top level for sample 0 only
    for level in out:
        assert torch.equal(level[:, :, 0], level[:, :, 1]) != frame_embedding
    for got, want in zip(alone, out):  # each sample's frames get their own places, whatever the batch
        torch.testing.assert_close(got, want[1:], rtol=1e-5, atol=1e-6)
    # sample 1 has no top level there (its inner level gets no top-level features), sample 0 is unchanged
    torch.testing.assert_close(top_for_first_only[0], out[0][:1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(top_for_first_only[1][:1], out[1][:1], rtol=1e-5, atol=1e-6)
    # An inner frame has the place of the outer frame it was kept from (every 2nd here).
    assert torch.equal(frame_places(2, torch.device("cpu")), frame_places(4, torch.device("cpu"))[::2])


def test_subsampled_inner_frames_feed_their_outer_frames():
    model = randomize(NestedUNet(tiny_video()))
    z = [torch.randn(2, 3, 4, 16, 16), torch.randn(2, 3, 2, 8, 8)]
    out = model(z, torch.tensor([5.0, 50.0]))
    assert [tuple(level.shape) for level in out] == [(2, 3, 4, 16, 16), (2, 3, 2, 8, 8)]
    with pytest.raises(ValueError, match="clips"):
        model([torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)], torch.tensor([5.0, 50.0]))
    with pytest.raises(ValueError, match="frames"):
        ModelConfig(levels=tiny(2).levels, frames=[3, 4])


def test_text_and_class_conditioning_reach_every_frame():
    from matryoshka.models import Conditioning

    model = randomize(NestedUNet(replace(tiny_video(), text_dim=8, num_classes=3)))
    z = [torch.randn(2, 3, 4, 16, 16), torch.randn(2, 3, 2, 8, 8)]
    t = torch.tensor([20.0, 200.0])
    text = torch.randn(2, 5, 8)
    with torch.no_grad():
        base = model(z, t, Conditioning(labels=torch.tensor([0, 1]), text=text))[0]
        other_text = model(z, t, Conditioning(labels=torch.tensor([0, 1]), text=text + 1))[0]
        other_label = model(z, t, Conditioning(labels=torch.tensor([2, 1]), text=text))[0]
    for frame in range(4):
        assert not torch.equal(base[:, :, frame], other_text[:, :, frame])
        assert not torch.equal(base[0, :, frame], other_label[0, :, frame])
        assert torch.equal(base[1, :, frame], other_label[1, :, frame])


def test_init_from_an_image_run_inflates(tmp_path):
    run = tmp_path / "image"
    assert main(["train", "tiny", f"run_dir={run}", "train.steps=1", *FAST]) == 0
    image = load_pipeline(run).model
    video = NestedUNet(video_of(tiny(2), [2, 2])).to(memory_format=torch.channels_last)  # as the pipeline's
    init_inner_from(video, run, sharded=False)
    z = [torch.randn(2, 3, 2, 16, 16), torch.randn(2, 3, 2, 8, 8)]
    t = torch.tensor([3.0, 400.0])
    with torch.no_grad():
        out = video(z, t)
        want = image([fold_frames(level) for level in z], t.repeat_interleave(2))
    for got, expected in zip(out, want):
        assert torch.equal(fold_frames(got), expected)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_samplers_on_the_video_pyramid(sampler):
    model = randomize(NestedUNet(tiny_video())).eval()
    process = MatryoshkaDiffusion(squaredcos(), num_levels=2, factor=2, frames=[4, 2], upsampled_residual=True)
    noise = process.initial_noise(2, 3, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        levels = get_sampler(sampler)(model, noise, process, 3, generator=torch.Generator().manual_seed(1))
    assert [tuple(level.shape) for level in levels] == [(2, 3, 4, 16, 16), (2, 3, 2, 8, 8)]
    assert all(torch.isfinite(level).all() for level in levels)


# ----- data ---------------------------------------------------------------------------------


def motion_set(**overrides) -> EmojiMotionDataset:
    settings = {"source": "emoji-motion", "resolution": 16, "frames": 4, "captions": True, **overrides}
    return EmojiMotionDataset(DataConfig(**settings))


def centroid_and_area(clip: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: (x, y) centroid and area of the pixels that differ from the background (corner)."""
    pixels = clip.permute(1, 2, 3, 0).numpy()  # (F, H, W, 3)
    sprite = np.abs(pixels - pixels[:, :1, :1]).sum(-1) > 0.2
    ys, xs = np.mgrid[: pixels.shape[1], : pixels.shape[2]]
    area = sprite.sum((1, 2))
    centre = np.stack([(xs * sprite).sum((1, 2)) / area, (ys * sprite).sum((1, 2)) / area], axis=1)
    return centre, area


def test_emoji_motion_is_deterministic_and_captions_say_the_motion():
    first, second = motion_set(), motion_set()
    assert len(first) == len(second) and len(first) % len(MOTIONS) == 0
    heart = next(i for i in range(0, len(first), len(MOTIONS)) if first.clip(i)[1] == f"red heart {MOTIONS[0]}")
    for offset, motion in enumerate(MOTIONS):
        item = first[heart + offset]
        assert torch.equal(item["image"], second[(heart + offset, 123)]["image"])
        assert item["caption"] == f"red heart {motion}" and item["image"].shape == (3, 4, 16, 16)
        centre, area = centroid_and_area(item["image"])
        dx, dy = centre[-1] - centre[0]
        if motion == "moving left":
            assert dx < -3 and abs(dy) < 1
        elif motion == "moving right":
            assert dx > 3 and abs(dy) < 1
        elif motion == "moving up":
            assert dy < -3 and abs(dx) < 1
        elif motion == "moving down":
            assert dy > 3 and abs(dx) < 1
        elif motion == "growing":
            assert all(np.diff(area) > 0)
        elif motion == "bouncing":
            assert np.ptp(centre[:, 1]) > 3 and np.ptp(centre[:, 0]) < 1
        else:  # rotating: stays in place, changes
            assert np.abs(centre[-1] - centre[0]).max() < 1.5
            assert not torch.equal(item["image"][:, 0], item["image"][:, 1])
    assert motion_set(captions=False)[heart]["caption"] == ""


def test_emoji_motion_sprites_picks_a_smaller_vocabulary_evenly():
    full = EmojiMotionDataset(DataConfig(source="emoji-motion", resolution=16, frames=2))
    few = EmojiMotionDataset(DataConfig(source="emoji-motion", resolution=16, frames=2, sprites=5))
    assert len(few) == 5 * len(MOTIONS)
    assert list(few.rows) == [full.rows[round(i * (len(full.rows) - 1) / 4)] for i in range(5)]
    assert few.clip(len(MOTIONS))[1] == full.clip(int(np.searchsorted(full.rows, few.rows[1])) * len(MOTIONS))[1]
    # `--reference emoji-motion` for such a run reads its sprites only
    from matryoshka.evaluation.reference import reference_dataset
    from matryoshka.evaluation.video import ClipLayout

    reference = reference_dataset("emoji-motion", 16, few.cfg, ClipLayout(2, (2,)))
    assert len(reference) == 5 * len(MOTIONS) and list(reference.rows) == list(few.rows)
    with pytest.raises(DataConfigError, match="sprites"):
        DataConfig(source="imagefolder", path="x", sprites=5)
    with pytest.raises(ValueError, match="only"):
        EmojiMotionDataset(DataConfig(source="emoji-motion", resolution=16, frames=2, sprites=len(full.rows) + 1))


def frames_with_levels(count: int, side: int = 24) -> np.ndarray:
    """Frames whose brightness rises with their index, so decoded order can be checked."""
    return np.stack([np.full((side, side + 8, 3), 20 + 20 * index, np.uint8) for index in range(count)])


def test_videofolder_reads_clips_and_skips_bad_videos(tmp_path):
    write_mp4(frames_with_levels(9), tmp_path / "a" / "long.mp4")
    (tmp_path / "a" / "long.txt").write_text("a grey square getting brighter\n")
    write_gif(frames_with_levels(5), tmp_path / "b" / "short.gif")
    write_mp4(frames_with_levels(2), tmp_path / "b" / "too_short.mp4")
    (tmp_path / "b" / "corrupt.webm").write_bytes(b"\x1aE\xdf\xa3 this is not a webm file")
    (tmp_path / "b" / "empty.avi").write_bytes(b"")
    dataset = build_dataset(
        dict(
            source="videofolder",
            path=str(tmp_path),
            frames=3,
            frame_stride=2,
            resolution=16,
            captions=True,
            label="folder",
        )
    )
    skipped = dataset.skipped["by_reason"]
    assert len(dataset) == 2 and skipped == {"too_short": 1, "corrupt": 1, "zero_bytes": 1}
    assert dataset.class_names == ["a", "b"]
    item = dataset[0]
    assert item["image"].shape == (3, 3, 16, 16) and item["label"] == 0
    assert item["caption"] == "a grey square getting brighter"
    # crop=center takes the middle clip: frames 2, 4, 6 of 9 (brightness 60, 100, 140).
    means = ((item["image"].mean(dim=(0, 2, 3)) + 1) * 127.5).numpy()
    np.testing.assert_allclose(means, [60, 100, 140], atol=4)
    gif = dataset[1]
    assert gif["caption"] == "" and gif["label"] == 1
    np.testing.assert_allclose(((gif["image"].mean(dim=(0, 2, 3)) + 1) * 127.5).numpy(), [20, 60, 100], atol=4)


def test_data_export_writes_decodable_mp4_with_captions(tmp_path):
    out = tmp_path / "motion"
    assert main(["data", "emoji-motion", "--out", str(out), "--size", "16", "--frames", "4", "--count", "7"]) == 0
    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == 7 and decoded(videos[0]).shape == (4, 16, 16, 3)
    assert [path.with_suffix(".txt").read_text().strip() for path in videos] == [
        motion_set().clip(i)[1] for i in range(7)
    ]


# ----- the run ------------------------------------------------------------------------------


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tiny_video_train_resume_sample(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    options = [*FAST, "train.checkpoint_every=2", "diffusion.upsampled_residual=true"]
    # the uninterrupted run also evaluates every 2 steps (per-frame FD and temporal measures at every level)
    evaluation = ["eval.every=2", "eval.num=4", "eval.steps=2", "eval.reference=emoji-motion", "eval.max_reference=8"]
    evaluation += ["eval.metrics=[fd,temporal]"]
    assert main(["train", "tiny-video", f"run_dir={straight}", "train.steps=4", *options, *evaluation]) == 0
    assert main(["train", "tiny-video", f"run_dir={resumed}", "train.steps=2", *options]) == 0
    assert main(["train", "tiny-video", f"run_dir={resumed}", "train.steps=4", *options]) == 0
    evaluations = [m for m in metrics(straight) if "fd_effnet-lite0/4x16x16" in m]
    assert [m["step"] for m in evaluations] == [2, 4]
    for level in ("4x16x16", "2x8x8"):
        assert all(m[f"fd_effnet-lite0/{level}"] > 0 and m[f"frame_diff_ref/{level}"] > 0 for m in evaluations)
    a = [m for m in metrics(straight) if "loss" in m]
    b = metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for key in ("loss", "loss/4x16x16", "loss/2x8x8"):
        np.testing.assert_allclose([m[key] for m in b], [m[key] for m in a], rtol=1e-5, err_msg=key)

    out = tmp_path / "samples"
    assert main(["sample", str(resumed), "--num", "2", "--steps", "2", "--fps", "4", "--out", str(out)]) == 0
    for folder, (frames, side) in {"4x16px": (4, 16), "2x8px": (2, 8)}.items():
        for index in range(2):
            assert decoded(out / folder / f"{index:04d}.mp4").shape == (frames, side, side, 3)
            assert (out / folder / f"{index:04d}.gif").is_file()
            strip = out / folder / f"{index:04d}.png"
            assert Image.open(strip).size == (frames * (side + 1) - 1, side)
        assert (out / f"grid_{folder}.png").is_file()
    assert json.loads((out / "settings.json").read_text())["fps"] == 4
    levels = load_pipeline(resumed).generate(num=3, steps=2)
    assert [tuple(level.shape) for level in levels] == [(3, 3, 4, 16, 16), (3, 3, 2, 8, 8)]


def test_video_run_configs_are_checked():
    with pytest.raises(ValueError, match=r"data\.frames"):
        load_run_config("tiny-video", ["data.frames=8"])
    with pytest.raises(ValueError, match="frames"):
        load_run_config("tiny", ["data.source=emoji-motion"])
    with pytest.raises(ValueError, match="max_reference"):
        load_run_config("tiny-video", ["eval.every=10", "eval.max_reference=1"])
    for preset in ("emoji-video", "emoji-video-text"):
        config = load_run_config(preset)
        assert config.model.frames == [4, 8] and config.data.frames == 8 and config.data.resolution == 32
        joint = load_run_config(preset, ["data.image_source=emoji", "data.image_fraction=0.25"]).data
        assert joint.sprites == 64 and joint.image_config().sprites == 0  # the sprites are emoji-motion's
    # the preview prompts name sprites the preset trains on
    dataset = EmojiMotionDataset(replace(config.data, resolution=16, frames=2))
    names = {dataset.table.names[row] for row in dataset.rows}
    motions = "|".join(MOTIONS)
    assert all(re.fullmatch(f"(.+) ({motions})", p).group(1) in names for p in config.sample.prompts)


def test_video_model_pools_like_the_process():
    """The trainer's lower-level batches for progressive video training match the process's pyramid."""
    from matryoshka.training.batches import top_images

    process = MatryoshkaDiffusion(squaredcos(), num_levels=2, factor=2, frames=[4, 2])
    clips = torch.randn(2, 3, 4, 16, 16)
    inner = top_images({"image": clips}, torch.device("cpu"), 1, 2, frame_stride=2)
    torch.testing.assert_close(inner, process.pyramid(clips)[1])
    assert torch.equal(top_images({"image": clips}, torch.device("cpu"), 0, 2), clips)


def test_progressive_video_run_and_init_from_an_image_run(tmp_path):
    """The inner stage trains on subsampled clips; a video run can start from an image run's weights."""
    run = tmp_path / "progressive"
    stages = "stages=[{levels: 1, steps: 2}, {levels: 2}]"
    assert main(["train", "tiny-video", f"run_dir={run}", "train.steps=3", stages, *FAST]) == 0
    assert [sorted(k for k in m if k.startswith("loss/")) for m in metrics(run)] == [
        ["loss/2x8x8"],
        ["loss/2x8x8"],
        ["loss/2x8x8", "loss/4x16x16"],
    ]
    image, video = tmp_path / "image", tmp_path / "video"
    assert main(["train", "tiny", f"run_dir={image}", "train.steps=1", *FAST]) == 0
    assert main(["train", "tiny-video", f"run_dir={video}", f"init_from={image}", "train.steps=1", *FAST]) == 0
