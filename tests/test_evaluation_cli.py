"""`mdm eval` and `mdm eval-stats` end to end on a tiny model, and the in-training hook."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from matryoshka.checkpoints import save_checkpoint
from matryoshka.cli.main import main
from matryoshka.config.presets import tiny
from matryoshka.data import DataConfig
from matryoshka.evaluation import ReferenceStats, evaluate_pipeline, run_evaluation
from matryoshka.evaluation.errors import EvaluationError
from matryoshka.evaluation.features import images_to_uint8
from matryoshka.evaluation.sampling import batch_seed
from matryoshka.models import NestedUNet
from matryoshka.pipeline import Pipeline, build_process, load_pipeline


def mdm(*argv: str) -> int:
    return main([str(a) for a in argv])


def make_folder(root: Path, count: int = 10, side: int = 20) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(root / f"{index}.png")
    return root


def make_run(run: Path, folder: Path, num_classes: int = 0) -> Path:
    """A checkpoint of an untrained tiny model (16px nested in 8px): no training needed to test evaluation."""
    base = tiny()
    config = replace(
        base,
        run_dir=str(run),
        model=replace(base.model, num_classes=num_classes),
        data=DataConfig(source="imagefolder", path=str(folder), resolution=16),
    )
    return save_untrained(run, config, step=7)


def save_untrained(run: Path, config, step: int) -> Path:
    """``run`` with one checkpoint of ``config``'s model at its seed-0 initial weights (no training needed)."""
    torch.manual_seed(0)
    model = NestedUNet(config.model)
    state = {"step": step, "num_levels": config.model.num_levels, "train_seconds": 90.0}
    save_checkpoint(run, step, model.state_dict(), model.state_dict(), state, config, keep=1)
    return run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    folder = make_folder(root / "images")
    return root, folder, make_run(root / "run", folder)


def test_eval_stats_then_eval_end_to_end_with_a_resumable_cache(setup, capsys, monkeypatch):
    root, folder, run = setup
    stats_path = root / "stats.npz"
    assert mdm("eval-stats", folder, "--out", stats_path, "--run", run, "--feature", "effnet-lite0", "--quiet") == 0
    stats = ReferenceStats.load(stats_path)
    assert stats.level_sizes == [16, 8] and stats.resolution == 16 and stats.feature_name == "effnet-lite0"
    assert stats.levels[8].count == 10 and stats.levels[8].features.shape == (10, 1280)
    assert stats.levels[16].cov.shape == (1280, 1280)

    report_path = root / "report.json"
    argv = [
        "eval",
        run,
        "--reference",
        stats_path,
        "--num",
        6,
        "--steps",
        2,
        "--batch-size",
        4,
        "--metrics",
        "fid,kid,pr",
        "--out",
        report_path,
        "--kid-subsets",
        5,
        "--quiet",
    ]
    assert mdm(*argv) == 0
    printed = capsys.readouterr().out
    assert "fd_effnet-lite0" in printed and "16x16" in printed and "NOT comparable with published FIDs" in printed
    assert "checkpoint step 7 (1.5 training minutes)" in printed
    report = json.loads(report_path.read_text())
    keys = {
        "fd_effnet-lite0",
        "kid_effnet-lite0",
        "kid_std_effnet-lite0",
        "precision_effnet-lite0",
        "recall_effnet-lite0",
    }
    assert set(report["metrics"]) == {f"{key}/{level}" for key in keys for level in ("16x16", "8x8")}
    assert all(np.isfinite(value) for value in report["metrics"].values())
    assert report["levels"] == ["16x16", "8x8"] and report["num"] == 6 and report["step"] == 7
    assert report["train_minutes"] == 1.5  # the trainer's count, carried in the weights' metadata
    assert report["sampling"] == {
        "sampler": "dpm++2m",
        "steps": 2,
        "guidance": 1.0,
        "seed": 0,
        "batch_size": 4,
        "labels": "none",
        "prompts": "",
        "options": {},
        "autoguidance": "",
    }
    assert report["feature"]["name"] == "effnet-lite0" and report["feature"]["fid_comparable"] is False
    cache = Path(report["cache"])
    assert cache.parent == run / "eval" / "samples" and len(list(cache.glob("batch_*.npz"))) == 2

    # an interrupted evaluation: one batch lost; only that batch is generated again, to the same samples
    (cache / "batch_000001.npz").unlink()
    calls = []
    original = Pipeline.generate
    monkeypatch.setattr(Pipeline, "generate", lambda self, **kw: calls.append(kw["num"]) or original(self, **kw))
    assert mdm(*argv) == 0
    assert calls == [2]
    again = json.loads(report_path.read_text())
    for key, value in report["metrics"].items():
        assert again["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key

    # a reference folder directly (statistics computed on the fly), default report path
    assert (
        mdm(
            "eval",
            run,
            "--reference",
            folder,
            "--num",
            4,
            "--steps",
            2,
            "--batch-size",
            4,
            "--metrics",
            "fd",
            "--feature",
            "effnet-lite0",
            "--no-cache",
            "--quiet",
        )
        == 0
    )
    assert list((run / "eval").glob("step_00000007_dpm++2m2_g1_seed0_n4_effnet-lite0_*_fd.json"))


def test_eval_explains_bad_inputs(setup, capsys, tmp_path):
    _root, folder, run = setup
    assert mdm("eval", run, "--reference", tmp_path / "nothing", "--num", 4, "--quiet") == 2
    assert "no such folder" in capsys.readouterr().err
    assert mdm("eval", run, "--reference", folder, "--metrics", "fd,bogus", "--quiet") == 2
    assert "unknown metric 'bogus'" in capsys.readouterr().err
    assert (
        mdm("eval-stats", folder, "--out", tmp_path / "s.npz", "--resolution", 16, "--levels", "16,5", "--quiet") == 2
    )
    assert "do not divide" in capsys.readouterr().err
    # FD-only statistics cannot serve KID
    assert (
        mdm(
            "eval-stats",
            folder,
            "--out",
            tmp_path / "fd.npz",
            "--run",
            run,
            "--max-features",
            0,
            "--feature",
            "effnet-lite0",
            "--quiet",
        )
        == 0
    )
    assert (
        mdm(
            "eval",
            run,
            "--reference",
            tmp_path / "fd.npz",
            "--num",
            4,
            "--steps",
            1,
            "--metrics",
            "kid",
            "--no-cache",
            "--quiet",
        )
        == 2
    )
    assert "feature vectors" in capsys.readouterr().err


def test_eval_measures_what_mdm_sample_makes_with_the_same_sampler_flags(setup, capsys):
    _root, folder, run = setup
    flags = ["--spacing", "mlmdm", "--threshold", "none"]
    common = ["--reference", folder, "--num", 4, "--steps", 2, "--batch-size", 4, "--metrics", "fd"]
    assert mdm("eval", run, *common, "--feature", "effnet-lite0", *flags, "--quiet") == 0
    assert "spacing mlmdm, threshold none, checkpoint step 7" in capsys.readouterr().out
    [report_path] = (run / "eval").glob("step_00000007_dpm++2m2_g1_seed0_spacing-mlmdm_threshold-none_n4_*_fd.json")
    report = json.loads(report_path.read_text())
    assert report["sampling"]["options"] == {"spacing": "mlmdm", "threshold": "none"}
    cache = Path(report["cache"])
    assert cache.name == "step_00000007_ema_dpm++2m2_g1_seed0_b4_spacing-mlmdm_threshold-none"
    assert json.loads((cache / "meta.json").read_text())["options"] == {"spacing": "mlmdm", "threshold": "none"}

    # the cached samples are what the pipeline makes with those options, not with the run's defaults
    with np.load(cache / "batch_000000.npz") as saved:
        cached = saved["level_16"]
    pipeline = load_pipeline(run, device="cpu")

    def made(**options):
        images = pipeline.generate(num=4, sampler="dpm++2m", steps=2, seed=batch_seed(0, 0), **options)[0]
        return images_to_uint8(images)

    np.testing.assert_array_equal(cached, made(spacing="mlmdm", threshold="none"))
    assert np.abs(cached.astype(int) - made().astype(int)).max() > 10

    # a combination the sampler refuses is refused before anything is sampled
    assert mdm("eval", run, *common, "--eta", 0.5, "--no-cache", "--quiet") == 2
    assert "eta applies to the ddim sampler only" in capsys.readouterr().err


def test_a_ddim_evaluation_names_its_eta_whoever_set_it(setup, capsys):
    """The report and the sample cache say the DDIM noise, per level, also when it is the run's default."""
    _root, folder, run = setup
    common = ["--reference", folder, "--num", 4, "--steps", 2, "--batch-size", 4, "--metrics", "fd", "--quiet"]
    for flags, eta, tag in (
        (["--eta", "1,0.5"], [1.0, 0.5], "eta-1-0.5"),
        ([], 0.0, "eta-0"),  # the run's sample.eta
    ):
        assert mdm("eval", run, *common, "--feature", "effnet-lite0", "--sampler", "ddim", *flags) == 0
        [report_path] = (run / "eval").glob(f"step_00000007_ddim2_g1_seed0_{tag}_n4_*_fd.json")
        report = json.loads(report_path.read_text())
        assert report["sampling"]["options"] == {"eta": eta}
        assert Path(report["cache"]).name == f"step_00000007_ema_ddim2_g1_seed0_b4_{tag}"
    with pytest.raises(SystemExit) as refused:
        mdm("eval", run, *common, "--sampler", "ddim", "--eta", "1,-2", "--no-cache")
    assert refused.value.code == 2
    assert "--eta: must be a number >= 0" in capsys.readouterr().err


def test_evaluate_pipeline_for_periodic_evaluation_in_training(setup):
    _root, _folder, run = setup
    loaded = load_pipeline(run, device="cpu")
    # what the trainer has in hand: an in-memory model, no checkpoint directory
    pipeline = Pipeline(loaded.model, build_process(loaded.config), loaded.config, step=3)
    metrics = evaluate_pipeline(pipeline, "train", num=4, feature="effnet-lite0", steps=1, batch_size=4)
    assert set(metrics) == {"fd_effnet-lite0/16x16", "fd_effnet-lite0/8x8"}
    assert all(value >= 0 for value in metrics.values())
    with pytest.raises(EvaluationError):
        evaluate_pipeline(pipeline, "train", num=1)


def test_clip_score_for_a_class_conditional_model(tmp_path):
    scorer = tiny_clip_scorer()
    folder = make_folder(tmp_path / "images", count=4)
    pipeline = load_pipeline(make_run(tmp_path / "run", folder, num_classes=3), device="cpu")
    report = run_evaluation(
        pipeline,
        folder,
        num=3,
        metrics="clip",
        steps=1,
        batch_size=3,
        clip_model=scorer,
        clip_prompt="a photo of a {}",
        class_names=["cat", "dog", "owl"],
    )
    assert set(report["metrics"]) == {"clip_score_tiny-clip/16x16", "clip_score_tiny-clip/8x8"}
    assert all(0 <= value <= 100 for value in report["metrics"].values())
    assert report["sampling"]["labels"] == "cycle" and report["clip"]["model"] == "tiny-clip"
    with pytest.raises(EvaluationError, match="CLIP model"):
        run_evaluation(pipeline, folder, num=3, metrics="clip", steps=1)


# ----------------------------------------------------------------------------- CLIP
class CharTokenizer:
    """A stand-in for a Hugging Face tokenizer: one id per character, end token 1, padding 1."""

    def __call__(self, texts, padding=True, truncation=True, max_length=16, return_tensors="pt"):
        ids = [[2 + ord(c) % 60 for c in text][: max_length - 1] + [1] for text in texts]
        width = max(map(len, ids))
        return {
            "input_ids": torch.tensor([row + [1] * (width - len(row)) for row in ids]),
            "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids]),
        }


def tiny_clip_scorer():
    import transformers

    from matryoshka.evaluation.clip import ClipScorer

    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    return ClipScorer(transformers.CLIPModel(config), CharTokenizer(), "tiny-clip")


def test_clip_score_agrees_with_the_model_own_similarity():
    scorer = tiny_clip_scorer()
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    texts = ["a red cat", "a dog", "a red cat"]
    cosines = scorer.similarities(images, texts)
    tokens = scorer.tokenizer(texts)
    with torch.no_grad():
        output = scorer.model(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            pixel_values=scorer.preprocess(images),
        )
    expected = output.logits_per_image.diagonal() / scorer.model.logit_scale.exp()
    torch.testing.assert_close(cosines, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scorer.scores(images, texts), 100 * expected.clamp(min=0), atol=1e-3, rtol=1e-4)
    with pytest.raises(ValueError):
        scorer.scores(images, texts[:2])


class FakeTextEncoder:
    """Stands in for the run's text encoder: a prompt's tokens are its length, repeated."""

    def __init__(self):
        self.seen = []

    def encode(self, prompts, device=None):
        import types

        self.seen += list(prompts)
        tokens = torch.stack([torch.full((3, 8), float(len(prompt))) for prompt in prompts])
        return types.SimpleNamespace(
            tokens=tokens.to(device), mask=torch.ones(len(prompts), 3, dtype=torch.bool, device=device)
        )


def test_text_to_image_model_generates_from_the_prompts_and_scores_them(tmp_path):
    from matryoshka.config.run import TextConfig

    base = tiny()
    config = replace(
        base,
        model=replace(base.model, text_dim=8),
        text=TextConfig(encoder="fake"),
        data=replace(base.data, captions=True),
    )
    torch.manual_seed(0)
    encoder = FakeTextEncoder()
    pipeline = Pipeline(NestedUNet(config.model), build_process(config), config, text_encoder=encoder)
    folder = make_folder(tmp_path / "images", count=4, side=16)
    prompts = ["a red cat", "a dog", "an owl at night"]
    report = run_evaluation(
        pipeline,
        folder,
        num=4,
        metrics="fd,clip",
        feature="effnet-lite0",
        steps=1,
        batch_size=4,
        prompts=prompts,
        clip_model=tiny_clip_scorer(),
    )
    assert encoder.seen == ["a red cat", "a dog", "an owl at night", "a red cat"]
    assert report["sampling"]["prompts"].startswith("3 prompts sha256:")
    assert set(report["metrics"]) == {
        f"{m}/{s}" for m in ("fd_effnet-lite0", "clip_score_tiny-clip") for s in ("16x16", "8x8")
    }
    with pytest.raises(EvaluationError, match="text-to-image"):
        run_evaluation(pipeline, folder, num=4, metrics="fd", feature="effnet-lite0", steps=1)
