import pytest
import torch

from matryoshka.data import DataConfig, EmptyDatasetError, MLMDMTSVDataset, build_dataset

from . import synthetic as syn


def jpg(colour):
    return syn.encode(syn.solid_image("RGB", (40, 30), colour), "JPEG")


def make_layout(root):
    """The layout of ml-mdm's tests/test_files: paths relative to the repository root."""
    files = root / "repo" / "tests" / "test_files"
    syn.write_tar(
        files / "images_00000.tar",
        [("0000000000.jpg", jpg((255, 0, 0))), ("0000000001.jpg", jpg((0, 0, 255))), ("0000000002.jpg", b"")],
    )
    syn.write_tar(files / "images_00001.tar", [("0000000003.png", syn.encode(syn.solid_image("LA", (30, 30))))])
    syn.write_tsv(
        files / "images_00000.tsv",
        ["tar", "file", "caption"],
        [
            ["tests/test_files/images_00000.tar", "0000000000.jpg", 'Manager in store with TVs, "quoted", laptops.'],
            ["tests/test_files/images_00000.tar", "0000000001.jpg", "A blue thing"],
            ["tests/test_files/images_00000.tar", "0000000002.jpg", "empty member"],
            ["tests/test_files/images_00000.tar", "missing.jpg", "not in the tar"],
            ["tests/test_files/gone.tar", "x.jpg", "tar does not exist"],
            ["only-one-column"],
        ],
    )
    # validation.tsv style: trailing tab in the header, tar named by base name only
    (files / "validation.tsv").write_text(
        "tar\tfile\tcaption\t\nimages_00001.tar\t0000000003.png\twhite\n", encoding="utf-8"
    )
    index = root / "repo" / "sample_training_0.tsv"
    index.write_text(
        "filename\ntests/test_files/images_00000.tsv\ntests/test_files/validation.tsv\ntests/test_files/nope.tsv\n",
        encoding="utf-8",
    )
    return index, files


def test_index_tsv(tmp_path, monkeypatch):
    index, _ = make_layout(tmp_path)
    monkeypatch.chdir(tmp_path)  # not the repository root: paths still resolve
    ds = build_dataset(DataConfig(source="mlmdm-tsv", path=str(index), resolution=16, captions=True))
    assert isinstance(ds, MLMDMTSVDataset)
    assert len(ds.shard_tsvs) == 2
    got = [(ds.describe(i).rsplit("/", 1)[-1], ds[i]["caption"], ds[i]["label"]) for i in range(len(ds))]
    assert got == [
        ("images_00000.tar:0000000000.jpg", 'Manager in store with TVs, "quoted", laptops.', -1),
        ("images_00000.tar:0000000001.jpg", "A blue thing", -1),
        ("images_00001.tar:0000000003.png", "white", -1),
    ]
    means = [ds[i]["image"].mean(dim=(1, 2)) for i in range(3)]
    for m, want in zip(means, [(1, -1, -1), (-1, -1, 1), (1, 1, 1)]):
        assert torch.allclose(m, torch.tensor(want, dtype=torch.float32), atol=0.06)
    assert ds.skipped["by_reason"] == {
        "unreadable_shard": 1,  # nope.tsv
        "zero_bytes": 1,
        "missing_member": 1,
        "missing_file": 1,
        "bad_row": 1,
    }


def test_shard_tsv_directly_and_from_cwd(tmp_path, monkeypatch):
    make_layout(tmp_path)
    monkeypatch.chdir(tmp_path / "repo")  # as ml-mdm runs it
    ds = build_dataset(DataConfig(source="mlmdm-tsv", path="tests/test_files/images_00000.tsv", resolution=8))
    assert len(ds) == 2 and all(ds[i]["caption"] == "" for i in range(2))


def test_bad_header_and_empty(tmp_path):
    bad = syn.write(tmp_path / "x.tsv", "url\tcaption\nhttp://a\tb\n")
    with pytest.raises(ValueError, match="expected an index TSV"):
        build_dataset(DataConfig(source="mlmdm-tsv", path=bad))
    syn.write_tar(tmp_path / "t.tar", [("a.png", syn.corrupt_bytes())])
    only_bad = syn.write_tsv(tmp_path / "s.tsv", ["tar", "file", "caption"], [["t.tar", "a.png", "c"]])
    with pytest.raises(EmptyDatasetError, match=r"s\.tsv.*1 rows.*not_an_image=1"):
        build_dataset(DataConfig(source="mlmdm-tsv", path=only_bad))
    with pytest.raises(FileNotFoundError):
        build_dataset(DataConfig(source="mlmdm-tsv", path=str(tmp_path / "absent.tsv")))
