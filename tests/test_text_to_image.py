"""Text-to-image end to end on the tiny preset with captions and the offline MiniLM encoder."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from matryoshka.cli.main import main
from matryoshka.config.presets import tiny
from matryoshka.config.run import TextConfig
from matryoshka.data.config import DataConfig
from matryoshka.pipeline import load_pipeline
from matryoshka.training.batches import batch_conditioning, sample_randomness, top_images
from matryoshka.training.trainer import Trainer
from matryoshka.utils.images import to_uint8

TEXT = ["model.text_dim=384", "text.encoder=minilm", "text.max_length=16", "data.captions=true"]


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioned")
    rng = np.random.default_rng(1)
    for index, word in enumerate(["red square", "blue circle", "green star", "yellow moon"] * 3):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"{index}.png")
        (root / f"{index}.txt").write_text(word)
    return root


def test_train_and_sample_with_prompts_and_guidance(tmp_path, captioned, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "tiny",
                f"run_dir={run}",
                "data.source=imagefolder",
                f"data.path={captioned}",
                *TEXT,
                "train.steps=3",
                "train.lr=0.01",
                "train.warmup_steps=1",
                "train.sample_every=3",
                f"text.cache_dir={tmp_path / 'cache'}",
                "sample.steps=2",
                "sample.num=2",
            ]
        )
        == 0
    )
    assert (run / "samples" / "step_00000003_16px.png").is_file()
    assert any((tmp_path / "cache").rglob("*.safetensors"))

    out = tmp_path / "out"
    assert (
        main(
            [
                "sample",
                str(run),
                "--prompt",
                "red square",
                "--prompt",
                "green star",
                "--num",
                "2",
                "--steps",
                "3",
                "--guidance",
                "4",
                "--negative-prompt",
                "blurry",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert len(list((out / "16px").glob("*.png"))) == 4
    assert (out / "prompts.txt").read_text().splitlines() == ["red square", "green star"]

    pipe = load_pipeline(run, use_ema=False)
    cond = pipe.condition(2, prompts=["red square", "green star"])
    plain, guided = (
        pipe.generate(num=2, steps=3, sampler="ddim", guidance=g, cond=cond, seed=0)[0] for g in (1.0, 4.0)
    )
    assert (plain - guided).abs().max() > 1e-3
    other = pipe.generate(num=2, steps=3, sampler="ddim", cond=pipe.condition(2, prompts=["blue circle"]), seed=0)[0]
    assert (plain - other).abs().max() > 1e-6
    assert main(["sample", str(run), "--num", "1"]) == 2
    assert "give --prompt" in capsys.readouterr().err


def test_negative_prompt_replaces_the_empty_prompt_in_guidance(tmp_path, captioned):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "tiny",
                f"run_dir={run}",
                "data.source=imagefolder",
                f"data.path={captioned}",
                *TEXT,
                "train.steps=3",
                "train.lr=0.01",
                "train.warmup_steps=1",
                "train.sample_every=100",
            ]
        )
        == 0
    )
    common = [
        "sample",
        str(run),
        "--prompt",
        "red square",
        "--num",
        "2",
        "--steps",
        "2",
        "--sampler",
        "ddim",
        "--guidance",
        "4",
        "--seed",
        "3",
    ]
    written = {}
    for name, extra in (("plain", []), ("negative", ["--negative-prompt", "blue circle"])):
        assert main([*common, *extra, "--out", str(tmp_path / name)]) == 0
        written[name] = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / name / "16px").glob("*.png"))])
    # The CLI guides against the negative prompt's embedding: the pipeline with that unconditional branch.
    pipe = load_pipeline(run)
    cond = pipe.condition(2, prompts=["red square"])
    negative = pipe.encode(["blue circle"] * 2)
    uncond = cond.unconditional()
    uncond.text, uncond.text_mask = negative.text, negative.text_mask
    expected = pipe.generate(num=2, sampler="ddim", steps=2, guidance=4.0, seed=3, cond=cond, uncond=uncond)[0]
    assert np.abs(to_uint8(expected).astype(int) - written["negative"].astype(int)).max() <= 1
    assert np.abs(written["negative"].astype(int) - written["plain"].astype(int)).max() > 2


def test_caption_dropout_rate_matches_probability(tmp_path, captioned):
    base = tiny()
    config = replace(
        base,
        run_dir=str(tmp_path / "r"),
        model=replace(base.model, text_dim=384),
        data=DataConfig(source="imagefolder", path=str(captioned), resolution=16, captions=True),
        text=TextConfig(encoder="minilm", max_length=16),
    )
    config.train.cond_drop_prob = 0.3
    config.train.batch_size = 12
    trainer = Trainer(config, quiet=True)
    trainer._ensure_stage()
    dropped = total = 0
    for step in range(150):
        trainer.step = step
        batch = next(trainer.loaders.batches)
        images = top_images(batch, trainer.device, 0, config.model.nest_ratio)
        _, _, drop = sample_randomness(trainer.process, batch["index"].tolist(), images, 0, step, 0.3)
        dropped += int(drop.sum())
        total += drop.numel()
    assert abs(dropped / total - 0.3) < 0.03
    batch = next(trainer.loaders.batches)
    cond = batch_conditioning(
        batch, torch.tensor([True] * 6 + [False] * 6), False, trainer.embed_captions, trainer.device
    )
    assert not cond.text_mask[:6].any() and cond.text_mask[6:].any(dim=1).all()
