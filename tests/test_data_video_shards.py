"""Video clips through the streaming ``shards`` source, and ``mdm data shards`` from video sources."""

import io
import json
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from matryoshka.cli.main import main
from matryoshka.data import DataConfig, DataConfigError, build_dataset, make_loader
from matryoshka.data.streaming import SAMPLE_BITS
from matryoshka.utils.video import encode_mp4, write_gif

from . import synthetic as syn
from .test_video import FAST, frames_with_levels, metrics, motion_set


def encode_webm(frames: np.ndarray) -> bytes:
    """VP9 in WebM, made in memory (another container and codec than the mp4 writer's)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="webm") as container:
        stream = container.add_stream("libvpx-vp9", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for pixels in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def gif_bytes(frames: np.ndarray, folder: Path) -> bytes:
    return write_gif(frames, folder / "clip.gif").read_bytes()


def video_config(path: str, **overrides) -> DataConfig:
    settings = {"source": "shards", "path": path, "resolution": 16, "frames": 3, "frame_stride": 2, "captions": True}
    return DataConfig(**{"shuffle_buffer": 0, **settings, **overrides})


def brightness(clip: torch.Tensor) -> np.ndarray:
    """Mean 8-bit level of every frame of a clip (3, F, H, W) in [-1, 1]."""
    return ((clip.mean(dim=(0, 2, 3)) + 1) * 127.5).numpy()


def test_video_members_stream_as_clips_and_bad_ones_are_counted(tmp_path):
    syn.write_tar(
        tmp_path / "shard-000.tar",
        [
            ("a/0.mp4", encode_mp4(frames_with_levels(9))),
            ("a/0.txt", b"a grey square getting brighter"),
            ("a/1.gif", gif_bytes(frames_with_levels(5), tmp_path)),
            ("a/2.webm", b"\x1aE\xdf\xa3 this is not a webm file"),
            ("a/2.txt", b"corrupt"),
            ("a/3.mp4", encode_mp4(frames_with_levels(2))),  # a clip needs (3 - 1) * 2 + 1 = 5 frames
        ],
    )
    syn.write_tar(
        tmp_path / "shard-001.tar",
        [
            ("b/0.mp4", b""),
            ("b/1.png", syn.encode(syn.solid_image("RGB", (16, 16)))),  # an image in video shards
            ("b/2.webm", encode_webm(frames_with_levels(7)[::-1].copy())),
            ("b/2.txt", b"getting darker"),
            ("b/3.mp4", encode_mp4(np.zeros((5, 40, 40, 3), np.uint8))),  # 1600-pixel frames: over the limit
        ],
    )
    dataset = build_dataset(video_config(str(tmp_path / "shard-{000..001}.tar"), max_image_pixels=1000))
    batch = next(make_loader(dataset, batch_size=8, seed=0, shuffle=False))
    assert batch["image"].shape == (8, 3, 3, 16, 16)
    assert dataset.skipped["by_reason"] == {
        "corrupt": 1,
        "too_short": 1,
        "zero_bytes": 1,
        "no_video": 1,
        "decompression_bomb": 1,
    }
    gif = 1
    webm = (1 << SAMPLE_BITS) | 2
    # every bad sample keeps its place, filled with the previous good one
    assert batch["index"].tolist() == [0, gif, gif, gif, gif, gif, webm, webm]
    assert batch["caption"] == ["a grey square getting brighter", *[""] * 5, "getting darker", "getting darker"]
    # crop=center: the middle clip, frames 2, 4, 6 of 9; the gif's 5 frames give 0, 2, 4; the webm 1, 3, 5 of 7
    np.testing.assert_allclose(brightness(batch["image"][0]), [60, 100, 140], atol=4)
    np.testing.assert_allclose(brightness(batch["image"][1]), [20, 60, 100], atol=4)
    np.testing.assert_allclose(brightness(batch["image"][6]), [120, 80, 40], atol=4)
    assert "5 skipped" in dataset.skip_report()

    # crop=random: a start drawn per sample and seed, the same on every read
    random_cfg = video_config(str(tmp_path / "shard-000.tar"), crop="random", frame_stride=1)
    reads = [next(make_loader(build_dataset(random_cfg), batch_size=2, seed=5, shuffle=False)) for _ in range(2)]
    assert torch.equal(reads[0]["image"], reads[1]["image"])
    levels = brightness(reads[0]["image"][0])
    assert np.allclose(np.diff(levels), 20, atol=4) and 20 - 4 <= levels[0] <= 140 + 4


def test_parquet_video_column_streams_like_tar_members(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    brighter, darker = encode_mp4(frames_with_levels(9)), encode_webm(frames_with_levels(7)[::-1].copy())
    syn.write_tar(
        tmp_path / "tar" / "shard-000.tar",
        [("a/0.mp4", brighter), ("a/0.txt", b"brighter"), ("a/1.webm", darker), ("a/1.txt", b"darker")],
    )
    # raw bytes in one row, {"bytes", "path"} (the encoded-video cell layout) in the other
    cells = [{"bytes": brighter, "path": None}, {"bytes": darker, "path": None}]
    (tmp_path / "pq").mkdir()
    pq.write_table(
        pyarrow.table({"video": cells, "text": ["brighter", "darker"]}), tmp_path / "pq" / "shard-000.parquet"
    )
    tar, parquet = (
        next(make_loader(build_dataset(video_config(str(tmp_path / name))), batch_size=2, seed=0, shuffle=False))
        for name in ("tar", "pq")
    )
    assert parquet["image"].shape == (2, 3, 3, 16, 16) and parquet["caption"] == ["brighter", "darker"]
    assert torch.equal(parquet["image"], tar["image"])
    np.testing.assert_allclose(brightness(parquet["image"][1]), [120, 80, 40], atol=4)


def test_frames_setting_for_shards_and_video_sources():
    assert DataConfig(source="shards", path="x.tar", frames=8).frames == 8
    with pytest.raises(DataConfigError, match=r"data\.frames"):
        DataConfig(source="videofolder", path="x", frames=0)
    with pytest.raises(DataConfigError, match=r"data\.frames"):
        DataConfig(source="webdataset", path="x.tar", frames=4)


def tar_members(pattern_folder: Path) -> dict[str, bytes]:
    members = {}
    for shard in sorted(pattern_folder.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            members.update({info.name: tar.extractfile(info).read() for info in tar if info.isfile()})
    return members


def test_mdm_data_shards_from_emoji_motion(tmp_path, capsys):
    out = tmp_path / "motion"
    argv = ["data", "shards", "--from", "emoji-motion", "--out", str(out), "--per-shard", "2", "--count", "5"]
    assert main([*argv, "--size", "16", "--frames", "4"]) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["count"] == 5 and info["shards"] == 3
    assert "data.frames=4" in capsys.readouterr().out
    members = tar_members(out)
    assert sorted(members) == sorted(f"{i:09d}.{ext}" for i in range(5) for ext in ("mp4", "txt"))

    dataset = build_dataset(video_config(info["pattern"], frames=4, frame_stride=1))
    batch = next(make_loader(dataset, batch_size=5, seed=0, shuffle=False))
    reference = motion_set()
    assert batch["caption"] == [reference.clip(i)[1] for i in range(5)]
    for i in range(5):  # the same clips, through H.264 (crf 18)
        error = (batch["image"][i] - reference[i]["image"]).abs().mean()
        assert error < 0.05, (i, float(error))
    assert dataset.skipped["total"] == 0


def test_mdm_data_shards_from_a_video_folder_keeps_the_files(tmp_path, capsys):
    folder = tmp_path / "videos"
    long_mp4 = encode_mp4(frames_with_levels(9))
    (folder / "cats").mkdir(parents=True)
    (folder / "cats" / "long.mp4").write_bytes(long_mp4)
    (folder / "cats" / "long.txt").write_text("a cat\n")
    write_gif(frames_with_levels(4), folder / "dogs" / "wag.gif")
    (folder / "dogs" / "short.mp4").write_bytes(encode_mp4(frames_with_levels(2)))
    (folder / "dogs" / "broken.webm").write_bytes(b"not a video")
    out = tmp_path / "shards"
    argv = ["data", "shards", "--from", str(folder), "--out", str(out), "--per-shard", "10", "--frames", "3"]
    assert main([*argv, "--label", "folder"]) == 0
    captured = capsys.readouterr()
    assert "too_short=1" in captured.err and "corrupt=1" in captured.err
    info = json.loads((out / "info.json").read_text())
    assert info["count"] == 2 and info["class_names"] == ["cats", "dogs"]
    members = tar_members(out)
    # whole files, byte for byte: the reader takes its clips from them
    assert members["000000000.mp4"] == long_mp4 and members["000000000.txt"] == b"a cat"
    assert members["000000000.cls"] == b"0" and members["000000001.cls"] == b"1"
    assert members["000000001.gif"] == (folder / "dogs" / "wag.gif").read_bytes()


def test_tiny_video_trains_on_video_shards_and_resumes(tmp_path):
    data = tmp_path / "data"
    argv = ["data", "shards", "--from", "emoji-motion", "--out", str(data), "--per-shard", "3", "--count", "6"]
    assert main([*argv, "--size", "16", "--frames", "4"]) == 0
    pattern = json.loads((data / "info.json").read_text())["pattern"]
    common = ["data.source=shards", f"data.path={pattern}", "data.shuffle_buffer=3", "train.checkpoint_every=2", *FAST]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", "tiny-video", f"run_dir={straight}", "train.steps=3", *common]) == 0
    assert main(["train", "tiny-video", f"run_dir={resumed}", "train.steps=2", *common]) == 0
    assert main(["train", "tiny-video", f"run_dir={resumed}", "train.steps=3", *common]) == 0
    a, b = metrics(straight), metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3]
    for key in ("loss", "loss/4x16x16", "loss/2x8x8"):
        np.testing.assert_allclose([m[key] for m in b], [m[key] for m in a], rtol=1e-5, err_msg=key)
