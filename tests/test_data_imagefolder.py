import numpy as np
import pytest
import torch
from PIL import Image

from matryoshka.data import (
    DataConfig,
    EmptyDatasetError,
    ImageFolderDataset,
    build_dataset,
    make_loader,
    print_skip_report,
)

from . import synthetic as syn


def make_tree(root):
    syn.write(root / "cats" / "a.png", syn.solid_image("RGB", (40, 30)))
    syn.write(root / "cats" / "a.txt", "a red cat\n")
    syn.write(root / "cats" / "b.jpg", syn.solid_image("CMYK", (30, 30)), "JPEG")
    syn.write(root / "cats" / "trunc.png", syn.truncated_png())
    syn.write(root / "cats" / "sub" / "deep.webp", syn.solid_image("RGB", (20, 20), (0, 0, 255)), "WEBP")
    syn.write(root / "dogs" / "c.png", syn.solid_image("I;16", (30, 40)))
    syn.write(root / "dogs" / "c.txt", "caf\xe9 au lait".encode("latin-1"))  # not UTF-8
    syn.write(root / "dogs" / "d.png", syn.solid_image("LA", (30, 30)))
    syn.write(root / "dogs" / "e.gif", syn.solid_image("P", (30, 30)), "GIF")
    syn.write(root / "dogs" / "f.TIFF", syn.solid_image("L", (30, 30)), "TIFF")
    syn.write(root / "dogs" / "bad.png", syn.corrupt_bytes())
    syn.write(root / "dogs" / "zero.jpg", b"")
    syn.write(root / "notes.md", "not an image")
    syn.write(root / ".hidden" / "x.png", syn.solid_image("RGB"))
    syn.write_jsonl(
        root / "metadata.jsonl",
        [
            {"file_name": "dogs/d.png", "text": "a white dog"},
            {"file_name": "cats/a.png", "text": "ignored: sidecar wins"},
        ],
    )
    syn.write(root / "dogs" / "metadata.jsonl", '{"file_name": "e.gif", "text": "a red gif"}\nnot json\n')


def test_imagefolder_labels_captions_and_skips(tmp_path):
    make_tree(tmp_path)
    ds = build_dataset(
        DataConfig(source="imagefolder", path=str(tmp_path), resolution=16, label="folder", captions=True)
    )
    assert isinstance(ds, ImageFolderDataset)
    assert ds.class_names == ["cats", "dogs"] and ds.num_classes == 2
    names = [ds.describe(i) for i in range(len(ds))]
    assert names == [
        "cats/a.png",
        "cats/b.jpg",
        "cats/sub/deep.webp",
        "dogs/c.png",
        "dogs/d.png",
        "dogs/e.gif",
        "dogs/f.TIFF",
    ]

    s = ds.skipped
    assert s["total"] == 3 and s["index_time"] == 3 and s["load_time"] == 0
    assert s["by_reason"] == {"truncated": 1, "not_an_image": 1, "zero_bytes": 1}
    assert s["examples"]["zero_bytes"] == ["dogs/zero.jpg (file is empty)"]
    assert s["warnings"] == {"caption_not_utf8": 1, "bad_metadata_line": 1}
    line = ds.skip_report()
    assert "7 items, 3 skipped" in line and "\n" not in line

    items = {ds.describe(i): ds[i] for i in range(len(ds))}
    expected = {  # (label, caption, mean colour)
        "cats/a.png": (0, "a red cat", (1, -1, -1)),
        "cats/b.jpg": (0, "", (1, -1, -1)),
        "cats/sub/deep.webp": (0, "", (-1, -1, 1)),
        "dogs/c.png": (1, "caf\ufffd au lait", (1, 1, 1)),
        "dogs/d.png": (1, "a white dog", (1, 1, 1)),
        "dogs/e.gif": (1, "a red gif", (1, -1, -1)),
        "dogs/f.TIFF": (1, "", (128 / 127.5 - 1,) * 3),
    }
    for i, (name, item) in enumerate(items.items()):
        label, caption, colour = expected[name]
        assert item["index"] == i and item["label"] == label and item["caption"] == caption
        assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
        assert torch.allclose(item["image"].mean(dim=(1, 2)), torch.tensor(colour, dtype=torch.float32), atol=0.05), (
            name
        )


def test_captions_off_and_no_labels(tmp_path):
    make_tree(tmp_path)
    ds = build_dataset(DataConfig(source="imagefolder", path=str(tmp_path), resolution=8))
    assert ds.class_names == [] and len(ds) == 7
    assert all(ds[i]["caption"] == "" and ds[i]["label"] == -1 for i in range(len(ds)))
    assert ds.skipped["warnings"] == {}


def test_images_outside_class_folders_are_counted(tmp_path):
    syn.write(tmp_path / "loose.png", syn.solid_image("RGB"))
    syn.write(tmp_path / "k" / "in.png", syn.solid_image("RGB"))
    ds = build_dataset(DataConfig(source="imagefolder", path=str(tmp_path), resolution=8, label="folder"))
    assert len(ds) == 1 and ds.skipped["by_reason"] == {"missing_label": 1}


def test_empty_and_all_bad_folders_raise(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyDatasetError, match=r"empty.*no usable images.*an empty directory"):
        build_dataset(DataConfig(source="imagefolder", path=str(tmp_path / "empty")))
    syn.write(tmp_path / "bad" / "x.png", b"")
    syn.write(tmp_path / "bad" / "y.jpg", syn.corrupt_bytes())
    syn.write(tmp_path / "bad" / "readme.txt", "hi")
    with pytest.raises(EmptyDatasetError) as info:
        build_dataset(DataConfig(source="imagefolder", path=str(tmp_path / "bad")))
    msg = str(info.value)
    assert str(tmp_path / "bad") in msg and "2 image files" in msg
    assert "zero_bytes=1" in msg and "not_an_image=1" in msg
    with pytest.raises(NotADirectoryError):
        build_dataset(DataConfig(source="imagefolder", path=str(tmp_path / "bad" / "readme.txt")))


def _with_late_failure(root):
    """A truncated JPEG passes verify() and only fails when decoded."""
    for k in range(6):
        syn.write(root / f"ok{k}.png", syn.solid_image("RGB", (20, 20), (k * 40, 0, 0)))
    rng = np.random.default_rng(0)
    jpg = syn.encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    syn.write(root / "ok2_late.jpg", jpg[: len(jpg) // 2])


def test_load_time_failure_is_substituted_and_counted(tmp_path, capsys):
    _with_late_failure(tmp_path)
    ds = build_dataset(DataConfig(source="imagefolder", path=str(tmp_path), resolution=8))
    assert len(ds) == 7 and ds.skipped["total"] == 0
    bad = [ds.describe(i) for i in range(len(ds))].index("ok2_late.jpg")
    item = ds[bad]
    assert item["index"] == bad + 1  # the next usable item
    s = ds.skipped
    assert s["load_time"] == 1 and s["by_reason"] == {"truncated": 1}
    assert s["examples"]["truncated"] == ["ok2_late.jpg (at load time)"]
    assert ds.num_usable == 6
    assert ds[bad]["index"] == bad + 1  # known bad: not decoded again
    assert ds.skipped["load_time"] == 1
    line = print_skip_report(ds)
    assert "1 skipped (truncated=1" in line and line in capsys.readouterr().err


def test_load_time_failures_in_workers_reach_the_main_process(tmp_path):
    _with_late_failure(tmp_path)
    ds = build_dataset(DataConfig(source="imagefolder", path=str(tmp_path), resolution=8))
    loader = make_loader(ds, batch_size=7, seed=0, num_workers=2)
    batch = next(loader)
    loader.close()
    assert batch["image"].shape == (7, 3, 8, 8)
    assert ds.skipped["load_time"] == 1 and ds.skipped["by_reason"] == {"truncated": 1}


def test_verify_off_defers_detection_to_load_time(tmp_path):
    syn.write(tmp_path / "a.png", syn.solid_image("RGB"))
    syn.write(tmp_path / "b.png", syn.truncated_png())
    syn.write(tmp_path / "c.png", b"")
    ds = build_dataset(DataConfig(source="imagefolder", path=str(tmp_path), resolution=8, verify=False))
    assert len(ds) == 2 and ds.skipped["by_reason"] == {"zero_bytes": 1}
    assert [ds[i]["index"] for i in range(2)] == [0, 0]
    assert ds.skipped["by_reason"] == {"zero_bytes": 1, "truncated": 1}


def test_decompression_bomb_is_skipped(tmp_path):
    syn.write(tmp_path / "big.png", syn.solid_image("RGB", (200, 200)))
    syn.write(tmp_path / "small.png", syn.solid_image("RGB", (20, 20)))
    ds = build_dataset(DataConfig(source="imagefolder", path=str(tmp_path), resolution=8, max_image_pixels=1000))
    assert len(ds) == 1 and ds.skipped["by_reason"] == {"decompression_bomb": 1}
