import dataclasses

import pytest

from matryoshka.data import DataConfig, DataConfigError, build_dataset


def test_defaults():
    cfg = DataConfig()
    assert cfg.source == "emoji" and cfg.path is None and cfg.resolution == 64
    assert cfg.crop == "center" and cfg.hflip is False and cfg.label == "none"
    assert cfg.captions is False and cfg.num_workers == 0 and cfg.shuffle is True
    assert DataConfig(**dataclasses.asdict(cfg)) == cfg


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"source": "s3"}, "source"),
        ({"resolution": 0}, "resolution"),
        ({"resolution": 64.0}, "resolution"),
        ({"resolution": True}, "resolution"),
        ({"crop": "middle"}, "crop"),
        ({"hflip": "yes"}, "hflip"),
        ({"label": "species"}, "label"),
        ({"label": "folder"}, "label"),  # not available for emoji
        ({"num_workers": -1}, "num_workers"),
        ({"source": "imagefolder"}, "path"),  # path required
        ({"source": "imagefolder", "path": "x", "label": "group"}, "label"),
        ({"source": "mlmdm-tsv", "path": "x", "label": "cls"}, "label"),
        ({"path": ""}, "path"),
        ({"max_image_pixels": 0}, "max_image_pixels"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(DataConfigError) as info:
        DataConfig(**kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(f"data.{field} ")
    assert isinstance(info.value, ValueError)  # what the generic config loader turns into a ConfigError


def test_messages_say_what_is_allowed():
    with pytest.raises(ValueError, match=r"^data.resolution must be >= 8, got 4$"):
        DataConfig(resolution=4)
    with pytest.raises(ValueError, match=r"^data.crop must be one of \['center', 'random'\], got 'middle'$"):
        DataConfig(crop="middle")
    with pytest.raises(ValueError, match=r"^data.label must be one of \['none', 'folder'\] for source 'imagefolder'"):
        DataConfig(source="imagefolder", path="x", label="group")


def test_replace_checks_again():
    with pytest.raises(DataConfigError, match=r"data.crop"):
        dataclasses.replace(DataConfig(), crop="diagonal")


def test_build_dataset_rejects_unknown_keys():
    with pytest.raises(DataConfigError, match=r"data.resolutoin is not a data setting"):
        build_dataset({"resolutoin": 32})


def test_build_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        build_dataset({"source": "imagefolder", "path": str(tmp_path / "does-not-exist")})
    with pytest.raises(DataConfigError, match=r"data.path"):
        build_dataset({"source": "webdataset"})
    with pytest.raises(DataConfigError, match=r"data.source"):
        build_dataset({"source": "lmdb", "path": "x"})
    with pytest.raises(TypeError):
        build_dataset(42)
