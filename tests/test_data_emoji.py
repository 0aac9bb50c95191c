import json
import time

import numpy as np
import pytest
import torch

from matryoshka.data import DataConfig, EmojiDataset, EmojiResourceError, build_dataset, export_emoji
from matryoshka.data.emoji import EMOJI_TEST_PATH, load_emoji_table, parse_emoji_test


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("emoji-cache"))


@pytest.fixture(scope="module")
def group_ds(cache_dir):
    t0 = time.perf_counter()
    ds = build_dataset(DataConfig(label="group", captions=True, cache_dir=cache_dir))
    ds.cold_seconds = time.perf_counter() - t0
    return ds


def test_parse_emoji_test():
    entries, groups, subgroups = parse_emoji_test(EMOJI_TEST_PATH)
    assert len(groups) == 10 and groups[0] == "Smileys & Emotion" and groups[-1] == "Flags"
    assert 90 <= len(subgroups) <= 120 and len(set(subgroups)) == len(subgroups)
    first = entries[0]
    assert first.codepoints == (0x1F600,) and first.status == "fully-qualified"
    assert first.name == "grinning face" and first.subgroup == "face-smiling"


def test_emoji_dataset_counts_labels_captions(group_ds):
    ds = group_ds
    assert isinstance(ds, EmojiDataset)
    assert 3000 < len(ds) < 4000
    assert ds.num_classes == 10 and ds.class_names[0] == "Smileys & Emotion" and ds.class_names[-1] == "Flags"
    labels = ds.labels
    assert labels.tolist() == ds.table.group[ds.items].tolist()
    assert [ds[i]["label"] for i in (0, len(ds) // 2, len(ds) - 1)] == labels[[0, len(ds) // 2, -1]].tolist()
    assert set(labels.tolist()) == set(range(10))
    assert ds.skipped["total"] == 0
    first = ds[0]
    assert first["caption"] == "grinning face" and first["label"] == 0 and first["index"] == 0
    names = [ds.table.names[r] for r in ds.items]
    assert all(names) and len(set(names)) > 3000
    assert "flag: Japan" in names and "red heart" in names
    # ZWJ sequences and skin tones resolved through GSUB ligatures
    assert "woman technologist: medium skin tone" in names
    assert "family: man, woman, girl, boy" in names
    assert ds.cold_seconds < 20


def test_emoji_pixels(group_ds):
    ds = group_ds
    rng = np.random.default_rng(0)
    for i in rng.choice(len(ds), 20, replace=False).tolist() + [0]:
        x = ds[i]["image"]
        assert x.dtype == torch.float32 and x.shape == (3, 64, 64)
        assert x.min() >= -1 and x.max() <= 1
        corners = x[:, [0, 0, -1, -1], [0, -1, 0, -1]]
        assert torch.allclose(corners, torch.ones_like(corners), atol=0.02)  # white background
        assert x.std() > 0.05  # not blank
    # the grinning face is yellow in the middle: red and green high, blue low
    r, g, b = ds[0]["image"][:, 28:36, 28:36].mean(dim=(1, 2)).tolist()
    assert r > 0.5 and g > 0.2 and b < 0.0


def test_emoji_cache_is_fast_and_identical(group_ds, cache_dir):
    t0 = time.perf_counter()
    table = load_emoji_table(64, cache_dir)
    elapsed = time.perf_counter() - t0
    assert table.from_cache and elapsed < 1.0
    assert np.array_equal(np.asarray(table.images), np.asarray(group_ds.table.images))
    assert table.names == group_ds.table.names


def test_subgroup_labels_unnamed_and_hflip(group_ds, cache_dir):
    ds = EmojiDataset(DataConfig(label="subgroup", cache_dir=cache_dir, hflip=True))
    assert 90 <= ds.num_classes <= 120 and ds[0]["label"] == 0 and ds[0]["caption"] == ""
    assert ds.class_names[0] == "face-smiling"
    flipped = [torch.equal(ds[(5, s)]["image"], group_ds[5]["image"].flip(-1)) for s in range(12)]
    assert any(flipped) and not all(flipped)
    full = EmojiDataset(DataConfig(cache_dir=cache_dir, emoji_keep_unnamed=True))
    assert len(full) > len(ds) and full[len(full) - 1]["label"] == -1
    assert full.table.stats["bitmaps"] == len(full)


def test_sprites_trains_on_a_smaller_vocabulary_spread_evenly(group_ds, cache_dir):
    few = EmojiDataset(DataConfig(label="group", cache_dir=cache_dir, sprites=5, captions=True))
    assert len(few) == 5
    picked = [round(i * (len(group_ds) - 1) / 4) for i in range(5)]
    for i, j in enumerate(picked):
        assert torch.equal(few[i]["image"], group_ds[j]["image"])
        assert few[i]["label"] == group_ds[j]["label"] and few[i]["caption"] == group_ds.name(j)
    with pytest.raises(ValueError, match="only"):
        EmojiDataset(DataConfig(cache_dir=cache_dir, sprites=len(group_ds) + 1))


def test_missing_resources_error():
    with pytest.raises(EmojiResourceError) as info:
        EmojiDataset(DataConfig(), font_path="/nonexistent/NotoColorEmoji.ttf")
    msg = str(info.value)
    assert "install the Debian packages `fonts-noto-color-emoji` and `unicode-data`" in msg
    assert "apt-get install fonts-noto-color-emoji unicode-data" in msg
    with pytest.raises(FileNotFoundError):
        EmojiDataset(DataConfig(), emoji_test_path="/nonexistent/emoji-test.txt")


def test_export_round_trip(group_ds, cache_dir, tmp_path):
    out = tmp_path / "emoji"
    res = export_emoji(str(out), 64, label="group", cache_dir=cache_dir)
    assert res["count"] == len(group_ds) and len(res["class_names"]) == 10
    lines = (out / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(group_ds)
    rec = json.loads(lines[0])
    assert rec["text"] == "grinning face" and rec["label"] == 0 and rec["file_name"].startswith("00-")
    assert (out / rec["file_name"]).with_suffix(".txt").read_text(encoding="utf-8").strip() == "grinning face"

    folder = build_dataset(
        DataConfig(source="imagefolder", path=str(out), resolution=64, label="folder", captions=True)
    )
    assert len(folder) == len(group_ds) and folder.skipped["total"] == 0
    assert folder.num_classes == 10
    # sorted class folders keep the emoji group order, and pixels survive the PNG round trip
    a, b = folder[0], group_ds[0]
    assert (a["label"], a["caption"]) == (b["label"], b["caption"])
    assert torch.equal(a["image"], b["image"])
    assert (
        np.bincount([folder.items[i][1] for i in range(len(folder))]).tolist()
        == np.bincount(group_ds.table.group[group_ds.items]).tolist()
    )


def test_export_with_colour_captions_matches_the_datasets_captions(cache_dir, tmp_path):
    out = tmp_path / "emoji"
    export_emoji(str(out), 64, label="none", cache_dir=cache_dir, colour_captions=True)
    records = {
        json.loads(line)["file_name"]: json.loads(line)["text"]
        for line in (out / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    }
    heart = next(name for name in records if name.endswith("-red-heart.png"))
    assert records[heart] == "red heart, red"
    assert (out / heart).with_suffix(".txt").read_text(encoding="utf-8") == "red heart, red\n"
    coloured = EmojiDataset(DataConfig(captions=True, colour_captions=True, cache_dir=cache_dir))
    assert sorted(records.values()) == sorted(coloured.caption(i) for i in range(len(coloured)))


def test_colour_captions_in_shards_and_refused_for_data_without_emoji_colours(tmp_path, capsys):
    import tarfile

    from matryoshka.cli.main import main

    out = tmp_path / "shards"
    assert main(["data", "shards", "--from", "emoji", "--out", str(out), "--count", "3", "--colour-captions"]) == 0
    with tarfile.open(out / "shard-000000.tar") as tar:
        captions = [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")]
    assert captions == [
        "grinning face, yellow",
        "grinning face with big eyes, yellow",
        "grinning face with smiling eyes, yellow",
    ]
    assert main(["data", "emoji-motion", "--out", str(tmp_path / "clips"), "--colour-captions"]) == 2
    assert "--colour-captions" in capsys.readouterr().err and not (tmp_path / "clips").exists()
