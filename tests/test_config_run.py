"""The run config: one level order (innermost first) and configs saved by earlier versions."""

import pytest
import yaml

from matryoshka.config import ConfigError, dump_yaml
from matryoshka.config.presets import load_run_config
from matryoshka.pipeline import build_process


def test_level_loss_weights_are_innermost_first_like_model_levels():
    config = load_run_config("tiny", ["diffusion.level_loss_weights=[1.0, 4.0]"])
    assert build_process(config).level_weights == [4.0, 1.0]  # the process lists levels highest first
    assert build_process(config, num_levels=1).level_weights == [1.0]  # the inner stage keeps its own weight
    with pytest.raises(ConfigError, match="needs 2 values"):
        load_run_config("tiny", ["diffusion.level_loss_weights=[1.0]"])


def test_old_highest_first_weights_are_refused_with_the_reordered_list(tmp_path):
    saved = dump_yaml(load_run_config("tiny"), tmp_path / "config.yaml")
    data = yaml.safe_load(saved.read_text())
    data["diffusion"].pop("level_loss_weights")
    data["diffusion"]["level_weights"] = [4.0, 1.0]
    saved.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"level_loss_weights=\[1.0, 4.0\]") as info:
        load_run_config(saved)
    assert info.value.path == "diffusion.level_weights"


def test_configs_saved_by_earlier_versions_still_load(tmp_path):
    saved = dump_yaml(load_run_config("tiny"), tmp_path / "config.yaml")
    data = yaml.safe_load(saved.read_text())
    data["diffusion"].pop("level_loss_weights")
    data["diffusion"]["level_weights"] = []
    data["model"]["spatial_dims"] = 2
    saved.write_text(yaml.safe_dump(data))
    assert load_run_config(saved) == load_run_config("tiny")
    data["model"]["spatial_dims"] = 3
    saved.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"model.spatial_dims"):
        load_run_config(saved)


def test_logit_normal_training_times_reach_the_process_and_bad_ones_are_refused():
    assert build_process(load_run_config("tiny")).time_logit_normal is None
    config = load_run_config("tiny", ["diffusion.time_logit_normal=[1.0, 0.5]"])
    assert build_process(config).time_logit_normal == (1.0, 0.5)
    for bad in ("[1.0]", "[0.0, -1.0]"):
        with pytest.raises(ConfigError, match="time_logit_normal"):
            load_run_config("tiny", [f"diffusion.time_logit_normal={bad}"])
