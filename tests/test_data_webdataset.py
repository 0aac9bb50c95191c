import json

import pytest
import torch

from matryoshka.data import DataConfig, EmptyDatasetError, WebDatasetTarDataset, build_dataset
from matryoshka.data.tars import expand_braces, expand_shards

from . import synthetic as syn

RED, BLUE = (255, 0, 0), (0, 0, 255)


def png(colour, mode="RGB"):
    return syn.encode(syn.solid_image(mode, (24, 16), colour))


def make_shards(d):
    syn.write_tar(
        d / "shard-000.tar",
        [
            ("s/0001.jpg", syn.encode(syn.solid_image("RGB", (24, 16), RED), "JPEG")),
            ("s/0001.cls", b"3"),
            ("s/0001.txt", b"a red square"),
            ("s/0002.png", png(BLUE)),
            ("s/0002.cls", b"1\n"),
            ("s/0002.json", json.dumps({"caption": "a blue square"}).encode()),
            ("s/0003.txt", b"caption without image"),
            ("s/0004.png", syn.corrupt_bytes()),
            ("s/0004.cls", b"0"),
        ],
    )
    syn.write_tar(
        d / "shard-001.tar",
        [
            ("0005.webp", syn.encode(syn.solid_image("RGBA", (16, 16), (0, 0, 0, 0)), "WEBP")),
            ("0005.cls", b"0"),
            ("0005.json", json.dumps({"text": "white"}).encode()),
            ("0006.png", b""),
            ("0006.cls", b"2"),
            ("0007.png", png(RED)),
            ("0007.cls", b"2"),
            ("0007.txt", "\xe9t\xe9".encode("latin-1")),
            ("0008.png", png(BLUE)),  # no .cls: skipped when labels are requested
        ],
    )
    syn.write(d / "shard-002.tar", syn.corrupt_bytes(1000))  # unreadable shard
    # shard-003.tar does not exist


def test_brace_expansion():
    assert expand_braces("a-{000..003}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar", "a-003.tar"]
    assert expand_braces("{a,b}/{8..10}") == ["a/8", "a/9", "a/10", "b/8", "b/9", "b/10"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert expand_braces("x{0..4..2}") == ["x0", "x2", "x4"]


def test_webdataset_samples_labels_captions(tmp_path):
    make_shards(tmp_path)
    cfg = DataConfig(
        source="webdataset", path=str(tmp_path / "shard-{000..003}.tar"), resolution=8, label="cls", captions=True
    )
    ds = build_dataset(cfg)
    assert isinstance(ds, WebDatasetTarDataset)
    assert len(ds.shards) == 4
    got = [(ds.describe(i).split(":")[-1], ds[i]["label"], ds[i]["caption"]) for i in range(len(ds))]
    assert got == [
        ("s/0001.jpg", 3, "a red square"),
        ("s/0002.png", 1, "a blue square"),
        ("0005.webp", 0, "white"),
        ("0007.png", 2, "\ufffdt\ufffd"),
    ]
    assert ds.class_names == ["0", "1", "2", "3"]
    colours = [ds[i]["image"].mean(dim=(1, 2)) for i in range(len(ds))]
    for c, want in zip(colours, [(1, -1, -1), (-1, -1, 1), (1, 1, 1), (1, -1, -1)]):
        assert torch.allclose(c, torch.tensor(want, dtype=torch.float32), atol=0.05)
    s = ds.skipped
    assert s["by_reason"] == {
        "unreadable_shard": 2,
        "no_image": 1,
        "not_an_image": 1,
        "zero_bytes": 1,
        "missing_label": 1,
    }
    assert any("shard-003.tar" in e for e in s["examples"]["unreadable_shard"])
    assert s["warnings"] == {"caption_not_utf8": 1}


def test_webdataset_without_labels_keeps_unlabelled_samples(tmp_path):
    make_shards(tmp_path)
    ds = build_dataset(DataConfig(source="webdataset", path=str(tmp_path), resolution=8))  # a directory of shards
    assert len(ds) == 5 and all(ds[i]["label"] == -1 and ds[i]["caption"] == "" for i in range(len(ds)))


def test_truncated_shard_keeps_complete_members(tmp_path):
    members = [(f"{k:04d}.png", png((k * 50, 0, 0))) for k in range(4)]
    path = syn.write_tar(tmp_path / "t.tar", members)
    data = (tmp_path / "t.tar").read_bytes()
    second = 512 + 512 * ((len(members[0][1]) + 511) // 512) + 512  # data offset of member 2
    syn.write(path, data[: second + len(members[1][1]) // 2])  # cut inside the second member
    ds = build_dataset(DataConfig(source="webdataset", path=str(path), resolution=8))
    assert len(ds) == 1 and ds.skipped["by_reason"] == {"truncated_shard": 1}


def test_only_bad_shards_raise(tmp_path):
    syn.write(tmp_path / "a.tar", b"")
    syn.write(tmp_path / "b.tar.gz", b"\x1f\x8b\x08\x00" + b"\x00" * 100)
    with pytest.raises(EmptyDatasetError, match=r"no usable images.*2 shard\(s\).*unreadable_shard=2"):
        build_dataset(DataConfig(source="webdataset", path=str(tmp_path / "{a.tar,b.tar.gz}")))
    with pytest.raises(FileNotFoundError):
        build_dataset(DataConfig(source="webdataset", path=str(tmp_path / "none-*.tar")))
    assert expand_shards(str(tmp_path / "a.tar") + "::" + str(tmp_path / "c{1..2}.tar"))[1:] == [
        str(tmp_path / "c1.tar"),
        str(tmp_path / "c2.tar"),
    ]
