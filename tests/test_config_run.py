"""The run config: one level order (innermost first) and configs saved by earlier versions."""

import importlib.util
from pathlib import Path

import pytest
import yaml

from matryoshka.config import ConfigError, dump_yaml
from matryoshka.config.presets import load_run_config
from matryoshka.pipeline import build_process

ROOT = Path(__file__).resolve().parents[1]


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


def test_emoji64_outer_level_sees_patches_and_the_groupnorm_presets_keep_pixels():
    patched = load_run_config("emoji64").model.levels[1]
    assert (patched.patch_size, patched.channels) == (2, [32, 64])
    for preset in ("emoji64-text", "emoji64-class", "emoji64-progressive"):
        outer = load_run_config(preset).model.levels[1]
        assert (outer.patch_size, outer.channels) == (1, [16, 32, 64]), preset
    assert load_run_config("emoji64").stages[0].steps == 1250
    assert load_run_config("emoji64-text").stages[0].steps == 2000
    # emoji64 samples in 100 stochastic DDIM steps; the GroupNorm presets keep the 25 DPM++(2M) steps they were
    # measured with
    sample = load_run_config("emoji64").sample
    assert (sample.sampler, sample.eta, sample.steps, sample.autoguidance) == ("ddim", [0.5, 2.0], 100, 2.0)
    assert sample.sampler_options()["eta"] == [2.0, 0.5]  # innermost first in the config, as the pyramid for samplers
    with pytest.raises(ConfigError, match="sample\\.eta needs one number or 2"):
        load_run_config("emoji64", ["sample.eta=[0.5,1,2]"])
    for preset in ("emoji64-text", "emoji64-class", "emoji64-progressive"):
        sample = load_run_config(preset).sample
        assert (sample.sampler, sample.eta, sample.steps) == ("dpm++2m", 0.0, 25), preset
    # both nest the 64² level around the same 16² one
    assert load_run_config("emoji64").model.level_sides(64) == load_run_config("emoji64-text").model.level_sides(64)


def test_time_to_quality_arms_are_valid_recipes():
    spec = importlib.util.spec_from_file_location("time_to_quality", ROOT / "benchmarks" / "time_to_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    recipes = {name: load_run_config("emoji64", overrides) for name, overrides in module.ARMS.items()}
    outers = {name: (run.model.levels[1].patch_size, run.model.levels[1].channels) for name, run in recipes.items()}
    assert outers["new"] == (2, [32, 64])
    assert outers["grown-rate"] == (1, [16, 32, 64]) and outers["old"] == (1, [32, 64, 64])
    assert recipes["grown-rate"].stages[0].steps == 2000 and recipes["new"].stages[0].steps == 1250
    assert recipes["grown-rate"].stages[1].grown_lr == 4e-2 and recipes["autoguided"].stages[1].grown_lr is None
    # Session 20 lowered the nested 16² level's rate; every earlier arm keeps the 1.2e-2 it was measured with.
    assert outers["patched"] == (2, [32, 64]) and recipes["new"].stages[1].lr == 6e-3
    assert all(recipes[name].stages[1].lr == 1.2e-2 for name in ("patched", "grown-rate", "autoguided", "magnitude"))
    # Session 22 samples emoji64 in 100 stochastic DDIM steps; the earlier arms keep the 25 DPM++(2M) ones.
    assert (recipes["new"].sample.sampler, recipes["new"].sample.steps) == ("ddim", 100)
    assert recipes["inner-rate"].stages[1].lr == 6e-3
    assert all(
        (recipes[name].sample.sampler, recipes[name].sample.steps) == ("dpm++2m", 25)
        for name in ("inner-rate", "patched", "grown-rate", "old")
    )
