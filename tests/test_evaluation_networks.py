"""Feature networks: EfficientNet-Lite0 with its real shipped weights, Inception with a generated state dict,
CLIP plumbing."""

import copy

import pytest
import torch

from matryoshka.evaluation import build_feature_extractor
from matryoshka.evaluation.efficientnet import load_efficientnet_lite0, preprocess
from matryoshka.evaluation.errors import EvaluationError
from matryoshka.evaluation.features import fuse_batchnorm, quantize
from matryoshka.evaluation.inception import FIDInceptionV3, load_fid_inception

# ImageNet classes of three synthetic patterns, each with a clear margin over the runner-up
CROSSWORD, MAZE, PING_PONG_BALL = 918, 646, 722


def synthetic_images(side: int = 64) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    checker = ((((x * 4).floor() + (y * 4).floor()) % 2) * 2 - 1).expand(3, side, side)
    spiral = torch.sign(torch.sin(torch.atan2(y, x) * 6 + (x**2 + y**2).sqrt() * 10)).expand(3, side, side)
    disk = torch.where(
        (x**2 + y**2) < 0.4, torch.tensor([1.0, 0.6, -1.0]).view(3, 1, 1), torch.tensor([-1.0, -0.2, 0.6]).view(3, 1, 1)
    )
    return torch.stack([checker, spiral, disk])


@pytest.fixture(scope="module")
def effnet():
    return load_efficientnet_lite0()


def test_effnet_lite0_real_weights_predict_stable_classes(effnet):
    images = synthetic_images()
    with torch.no_grad():
        logits = effnet(preprocess(images))
        alone = effnet(preprocess(images[2:]))  # the same answer without the rest of the batch
    assert logits.shape == (3, 1000)
    assert logits.argmax(1).tolist() == [CROSSWORD, MAZE, PING_PONG_BALL]
    torch.testing.assert_close(alone[0], logits[2], atol=1e-3, rtol=1e-4)


def test_effnet_lite0_recognises_emoji_objects(effnet):
    from matryoshka.data import DataConfig, EmojiResourceError, build_dataset

    try:
        emoji = build_dataset(DataConfig(resolution=64))
    except EmojiResourceError:
        pytest.skip("emoji font not installed")
    wanted = {"ambulance": 407, "soccer ball": 805, "basketball": 430, "umbrella": 879}
    found = {}
    for index in range(len(emoji)):
        name = emoji.name(index)
        if name in wanted and name not in found:
            found[name] = index
    assert set(found) == set(wanted)
    with torch.no_grad():
        logits = effnet(preprocess(torch.stack([emoji[i]["image"] for i in found.values()])))
    assert logits.argmax(1).tolist() == [wanted[name] for name in found]


def test_effnet_feature_extractor_is_the_network_with_folded_batch_norms(effnet):
    extractor = build_feature_extractor("effnet-lite0")
    assert (extractor.name, extractor.dim, extractor.fid_comparable) == ("effnet-lite0", 1280, False)
    images = synthetic_images(32)
    features = extractor(images)
    assert features.shape == (3, 1280) and features.dtype.name == "float32"
    with torch.no_grad():
        direct = effnet.features(preprocess(quantize(images)))
    torch.testing.assert_close(torch.from_numpy(features), direct, atol=1e-4, rtol=1e-4)


def randomise_batch_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                count = module.num_features
                module.running_mean.copy_(torch.rand(count, generator=generator) * 0.2 - 0.1)
                module.running_var.copy_(torch.rand(count, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(count, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(count, generator=generator) * 0.2 - 0.1)
    return model.eval()


def test_inception_layout_matches_the_fid_state_dict_names():
    state = FIDInceptionV3().state_dict()
    shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6e.branch7x7_2.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "fc.weight": (1008, 2048),
    }
    for name, shape in shapes.items():
        assert tuple(state[name].shape) == shape, name
    parameters = sum(
        value.numel()
        for name, value in state.items()
        if not name.startswith("bn") and "running" not in name and "num_batches" not in name
    )
    assert parameters == 23_850_960


def test_inception_loads_a_generated_state_dict(tmp_path):
    torch.manual_seed(0)
    model = randomise_batch_norms(FIDInceptionV3())
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}  # an older file
    state["AuxLogits.fc.weight"] = torch.zeros(1008, 768)  # torchvision-style extras are ignored
    path = tmp_path / "inception.pth"
    torch.save(state, path)

    loaded = load_fid_inception(path)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    extractor = build_feature_extractor("inception", inception_weights=path)
    assert (extractor.name, extractor.dim, extractor.fid_comparable) == ("inception", 2048, False)
    assert "sha256:" in extractor.weights
    features = extractor(images)
    assert features.shape == (1, 2048)
    with torch.no_grad():
        direct = loaded.features(torch.nn.functional.interpolate(quantize(images), size=(299, 299), mode="bilinear"))
    torch.testing.assert_close(torch.from_numpy(features), direct, atol=1e-4, rtol=1e-3)

    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(EvaluationError, match="not the FID InceptionV3"):
        load_fid_inception(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError):
        load_fid_inception(tmp_path / "missing.pth")


def test_fuse_batchnorm_keeps_the_function():
    torch.manual_seed(1)
    model = randomise_batch_norms(FIDInceptionV3(), seed=1)
    x = torch.rand(1, 3, 80, 80) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(
            fuse_batchnorm(copy.deepcopy(model)).features(x), model.features(x), atol=1e-5, rtol=1e-4
        )
