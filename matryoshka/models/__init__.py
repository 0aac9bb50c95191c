"""Denoising networks: the NestedUNet, its configuration and presets."""

from .conditioning import NULL_LABEL, Conditioning
from .config import LevelConfig, ModelConfig
from .nested_unet import NestedUNet
from .presets import MODEL_PRESETS, model_preset

__all__ = ["MODEL_PRESETS", "NULL_LABEL", "Conditioning", "LevelConfig", "ModelConfig", "NestedUNet", "model_preset"]
