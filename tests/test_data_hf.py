"""The ``hf`` source (local Hugging Face ``datasets``) and Parquet shards in the streaming source."""

import dataclasses

import datasets
import pytest

from matryoshka.data import DataConfig, build_dataset, make_loader
from matryoshka.data.streaming import SAMPLE_BITS

from . import synthetic as syn


def table(n=6, bad=None):
    images = [{"bytes": syn.encode(syn.solid_image("RGB", (20, 16), (i * 40, 0, 0))), "path": None} for i in range(n)]
    if bad is not None:
        images[bad] = {"bytes": syn.corrupt_bytes(), "path": None}
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["red", "dark"]),
        }
    )
    return datasets.Dataset.from_dict(
        {"image": images, "text": [f"row {i}" for i in range(n)], "label": [i % 2 for i in range(n)]}, features=features
    )


def test_hf_saved_folder_and_parquet_files(tmp_path):
    table(bad=4).save_to_disk(str(tmp_path / "saved"))
    for path in (str(tmp_path / "saved"), None):
        if path is None:
            table(bad=4).to_parquet(str(tmp_path / "part-0.parquet"))
            path = str(tmp_path / "part-*.parquet")
        ds = build_dataset(DataConfig(source="hf", path=path, resolution=8, captions=True, label="cls"))
        assert len(ds) == 5 and ds.class_names == ["red", "dark"]
        assert ds.skipped["by_reason"] in ({"corrupt": 1}, {"not_an_image": 1})
        batch = next(make_loader(ds, batch_size=5, seed=0, shuffle=False))
        assert batch["caption"] == ["row 0", "row 1", "row 2", "row 3", "row 5"]
        assert batch["label"].tolist() == [0, 1, 0, 1, 1] and batch["image"].shape == (5, 3, 8, 8)


def test_hf_missing_path_and_columns_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.path"):
        build_dataset(DataConfig(source="hf", path=str(tmp_path / "nothing.parquet")))
    datasets.Dataset.from_dict({"a": [1]}).to_parquet(str(tmp_path / "a.parquet"))
    with pytest.raises(ValueError, match=r"no image column"):
        build_dataset(DataConfig(source="hf", path=str(tmp_path / "a.parquet")))


def test_parquet_shards_stream_and_resume(tmp_path):
    for s in range(3):
        table(n=5 + s).to_parquet(str(tmp_path / f"train-{s:05d}.parquet"))
    cfg = DataConfig(
        source="shards",
        path=str(tmp_path / "train-{00000..00002}.parquet"),
        resolution=8,
        captions=True,
        label="cls",
        num_classes=2,
        shuffle_buffer=4,
    )
    expected = sorted((s << SAMPLE_BITS) | i for s in range(3) for i in range(5 + s))
    epoch = make_loader(build_dataset(dataclasses.replace(cfg, shuffle_buffer=0)), batch_size=18, seed=0)
    assert sorted(next(epoch)["index"].tolist()) == expected  # a window may cross epochs: none here
    loader = make_loader(build_dataset(cfg), batch_size=3, seed=0)
    full = [next(loader) for _ in range(8)]
    assert all(c == f"row {i & 0xFFFFFF}" for b in full for c, i in zip(b["caption"], b["index"].tolist(), strict=True))
    resumed = make_loader(build_dataset(cfg), batch_size=3, seed=0, start_step=5)
    assert [next(resumed)["index"].tolist() for _ in range(3)] == [b["index"].tolist() for b in full[5:]]


def test_mdm_data_shards_from_parquet(tmp_path):
    from matryoshka.cli.main import main

    table().to_parquet(str(tmp_path / "data.parquet"))
    out = tmp_path / "shards"
    assert (
        main(
            [
                "data",
                "shards",
                "--from",
                str(tmp_path / "data.parquet"),
                "--out",
                str(out),
                "--per-shard",
                "4",
                "--size",
                "8",
            ]
        )
        == 0
    )
    ds = build_dataset(DataConfig(source="shards", path=str(out), resolution=8, captions=True, shuffle_buffer=0))
    batch = next(make_loader(ds, batch_size=6, seed=0, shuffle=False))
    assert batch["caption"] == [f"row {i}" for i in range(6)] and len(ds.urls) == 2
