"""Fréchet Video Distance with the standard I3D network, from a weights file the user supplies.

FVD (Unterthiner et al. 2018) is the Fréchet distance between Gaussians fitted to I3D features
(Carreira and Zisserman 2017, trained on Kinetics-400) of real and generated clips. The network
cannot be fetched here, so the user passes the TorchScript port of the TF-Hub I3D that StyleGAN-V
(Skorokhodov et al. 2022) published and video papers since use, ``i3d_torchscript.pt``. It is
recognised by its content: the file's git blob id (SHA-1 over ``"blob <size>\\0"`` and the
bytes, as ``git hash-object`` prints it), the one published hash of that file we know of. A file
with another id is refused, so a number is only ever called FVD when it is one.

Clips are fed as StyleGAN-V does: 8-bit values as floats in [0, 255], ``rescale`` and ``resize``
left to the network (it maps to [-1, 1] and resizes to 224²), and the 400 pre-softmax logits
taken as features. I3D pools time down 8-fold, so clips shorter than 16 frames (the FVD
standard) are stretched to 16 by repeating frames; a report says so, as such FVDs only compare
with each other.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import EvaluationError
from .features import quantize
from .stats import FeatureStats, frechet_distance

I3D_GIT_BLOB = "93daef59c7ae0e9e8f76225521407e60cbafa6aa"
"""Git blob id of StyleGAN-V's ``i3d_torchscript.pt`` (``git hash-object i3d_torchscript.pt``)."""
FVD_FRAMES = 16
"""Clip length of the FVD standard; shorter clips are stretched to it."""


def git_blob_id(path: str | Path) -> str:
    """What ``git hash-object`` prints for the file: SHA-1 of ``b"blob <size>\\0"`` and the content."""
    path = Path(path)
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stretch_frames(clips: Tensor, frames: int = FVD_FRAMES) -> Tensor:
    """(B, C, F, H, W) with F < ``frames``: each frame repeated in turn to ``frames`` (nearest in time)."""
    count = clips.shape[2]
    if count >= frames:
        return clips
    index = torch.arange(frames, device=clips.device) * count // frames
    return clips[:, :, index]


class I3DFeatures:
    """The I3D network of a user-supplied ``i3d_torchscript.pt``: clips in [-1, 1] -> (N, 400) features."""

    name = "i3d"

    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        expected_blob: str | None = None,
    ) -> None:
        expected_blob = expected_blob or I3D_GIT_BLOB
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"I3D weights {str(path)!r}: no such file (StyleGAN-V's i3d_torchscript.pt)")
        found = git_blob_id(path)
        if found != expected_blob:
            raise EvaluationError(
                f"{path} is not StyleGAN-V's i3d_torchscript.pt: its git blob id is {found}, the I3D's is "
                f"{expected_blob}. FVD is only reported with that network; other networks' numbers would "
                "not compare with published FVDs"
            )
        # TorchScript holds no pickled Python, but the network it defines runs when called: the id
        # check above is the guard, pinning the file to the published one. PyTorch deprecates
        # TorchScript, but the published I3D exists only in that form.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.network = torch.jit.load(str(path), map_location=torch.device(device)).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.weights = f"{path.name} (git blob {found[:12]})"

    def describe(self) -> dict:
        return {"name": self.name, "weights": self.weights, "frames": FVD_FRAMES, "convention": "StyleGAN-V"}

    @torch.no_grad()
    def __call__(self, clips: Tensor) -> np.ndarray:
        """(N, 3, F, H, W) clips in [-1, 1] -> (N, D) float64 features."""
        if clips.ndim != 5 or clips.shape[1] != 3:
            raise ValueError(f"expected RGB clips (N, 3, F, H, W), got {tuple(clips.shape)}")
        outputs = []
        for start in range(0, len(clips), self.batch_size):
            batch = stretch_frames(quantize(clips[start : start + self.batch_size].to(self.device)))
            pixels = (batch + 1) * 127.5  # the 8-bit values, as StyleGAN-V feeds them
            features = self.network(pixels, rescale=True, resize=True, return_features=True)
            outputs.append(features.double().cpu())
        return torch.cat(outputs).numpy()


class FVDMeter:
    """FVD at every level of a video model whose clips have more than one frame."""

    def __init__(self, network: I3DFeatures, sizes, layout) -> None:
        self.network = network
        self.layout = layout
        self.sizes = list(sizes)
        self.frames = {size: count for size, count in zip(sizes, layout.level_frames) if count > 1}
        if not self.frames:
            raise EvaluationError("FVD needs clips of more than one frame; every level of this model has one")
        self.generated = {size: FeatureStats() for size in self.frames}
        self.real = {size: FeatureStats() for size in self.frames}

    def add_generated(self, size: int, clips: Tensor) -> None:
        if size in self.frames:
            self.generated[size].update(self.network(clips))

    def add_reference(self, dataset, max_clips: int | None, batch_size: int) -> None:
        """I3D statistics of the reference clips of ``dataset``: a seeded subset of ``max_clips``
        (a stream's first ones; None: all, or its first epoch), pooled into the model's pyramid
        as the process pools them."""
        from .reference import reference_batches

        batches, _ = reference_batches(dataset, max_clips, self.sizes, batch_size, self.layout)
        for levels in batches:
            for size, clips in zip(self.sizes, levels):
                if size in self.real:
                    self.real[size].update(self.network(clips))

    def results(self, name_of) -> dict[str, float]:
        return {
            f"fvd/{name_of[size]}": frechet_distance(
                self.real[size].mean, self.real[size].cov, self.generated[size].mean, self.generated[size].cov
            )
            for size in self.frames
        }

    def describe(self, name_of) -> dict:
        clips = {name_of[size]: self.generated[size].count for size in self.frames}
        reference = {name_of[size]: self.real[size].count for size in self.frames}
        stretched = {name_of[size]: count for size, count in self.frames.items() if count < FVD_FRAMES}
        return {
            **self.network.describe(),
            "clips": clips,
            "reference_clips": reference,
            "stretched_from_frames": stretched,  # levels whose clips were repeated to FVD_FRAMES
        }

    def warnings(self) -> list[str]:
        """Fewer clips than feature dimensions on a side leave its covariance singular: FVD is then biased."""
        fewest = min(stats.count for stats in (*self.generated.values(), *self.real.values()))
        dim = next(iter(self.real.values())).dim
        if fewest <= dim:
            return [f"FVD from {fewest} clips on a side, not more than the {dim} I3D features: biased and noisy"]
        return []


def start_fvd(pipeline, reference, weights, sizes, layout, device, max_clips: int | None, batch_size: int) -> FVDMeter:
    """An :class:`FVDMeter` for ``pipeline`` holding the reference clips' statistics (``mdm eval --metrics fvd``)."""
    from .reference import ReferenceStats, reference_dataset

    if weights is None:
        raise EvaluationError("FVD needs the I3D network: pass --i3d-weights i3d_torchscript.pt (docs/video.md)")
    if isinstance(reference, ReferenceStats) or str(reference).endswith(".npz"):
        raise EvaluationError(
            "FVD needs reference clips (a folder of videos, 'emoji-motion' or 'train'), not statistics: "
            "I3D features are not in `mdm eval-stats` files"
        )
    data = pipeline.config.data
    dataset = reference_dataset(str(reference), data.resolution, data, layout)
    meter = FVDMeter(I3DFeatures(weights, device, batch_size), sizes, layout)
    meter.add_reference(dataset, max_clips, batch_size)
    return meter
