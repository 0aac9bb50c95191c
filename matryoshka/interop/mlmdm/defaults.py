"""ml-mdm's option names, defaults and enum values, and what they correspond to here.

Facts about ml-mdm (its dataclasses' fields and defaults, its enums, its demo's sampling
settings) in one place, so the mapping modules hold logic only.
"""

from __future__ import annotations

from typing import Any

# Width of the token embeddings of the text encoders ml-mdm can name in ``text_model``.
# ml-mdm overwrites ``conditioning_feature_dim`` with this width when it builds the model.
TEXT_ENCODER_DIMS = {
    "google/flan-t5-small": 512,
    "google/flan-t5-base": 768,
    "google/flan-t5-large": 1024,
    "google/flan-t5-xl": 2048,
    "google/flan-t5-xxl": 4096,
    "google/t5-v1_1-small": 512,
    "google/t5-v1_1-base": 768,
    "google/t5-v1_1-large": 1024,
    "google/t5-v1_1-xl": 2048,
    "google/t5-v1_1-xxl": 4096,
}

# ml-mdm's default --text-model, used when a config names none.
DEFAULT_TEXT_MODEL = "google/flan-t5-xl"

# ml-mdm's option names and defaults: the fields of its UNetConfig / NestedUNetConfig /
# ResNetConfig / SamplerConfig / DiffusionConfig / NestedDiffusionConfig / ReaderConfig
# dataclasses, so that a config's unset options read as ml-mdm would read them.

UNET_DEFAULTS: dict[str, Any] = {
    "num_resnets_per_resolution": "2",
    "temporal_dim": None,
    "attention_levels": "2,3",
    "num_attention_layers": "1",
    "num_temporal_attention_layers": None,
    "conditioning_feature_dim": -1,
    "conditioning_feature_proj_dim": -1,
    "num_lm_head_layers": 0,
    "masked_cross_attention": 1,
    "resolution_channels": "128,256,256,512,1024",
    "skip_mid_blocks": False,
    "skip_cond_emb": False,
    "nesting": False,
    "micro_conditioning": None,
    "temporal_mode": False,
    "temporal_spatial_ds": False,
    "temporal_positional_encoding": False,
    "resnet_config": {},
}
NESTED_DEFAULTS: dict[str, Any] = {
    **UNET_DEFAULTS,
    "skip_mid_blocks": True,
    "skip_cond_emb": True,
    "inner_config": None,
    "skip_inner_unet_input": False,
    "skip_normalization": False,
    "initialize_inner_with_pretrained": None,
    "freeze_inner_unet": False,
    "interp_conditioning": False,
}
RESNET_DEFAULTS: dict[str, Any] = {
    "num_channels": -1,
    "output_channels": -1,
    "num_groups_norm": 32,
    "dropout": 0.0,
    "use_attention_ffn": False,
}
SAMPLER_DEFAULTS: dict[str, Any] = {
    "num_diffusion_steps": 32,
    "reproject_signal": False,
    "schedule_type": "DDPM",
    "prediction_type": "DDPM",
    "loss_target_type": None,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "threshold_function": "CLIP",
    "rescale_schedule": 1.0,
    "rescale_signal": None,
    "schedule_shifted": False,
    "schedule_shifted_power": 1,
}
DIFFUSION_DEFAULTS: dict[str, Any] = {
    "sampler_config": {},
    "model_output_scale": 0,
    "use_vdm_loss_weights": True,
}
NESTED_DIFFUSION_DEFAULTS: dict[str, Any] = {
    **DIFFUSION_DEFAULTS,
    "use_double_loss": False,
    "multi_res_weights": None,
    "no_use_residual": False,
    "use_random_interp": False,
    "mixed_ratio": None,
    "random_downsample": False,
    "average_downsample": False,
    "mid_downsample": False,
}
READER_TEXT_DEFAULTS: dict[str, Any] = {
    "max_caption_length": -1,
    "max_token_length": -1,
    "prepad_caption_with_space": True,
    "use_tokenizer_scores": True,
    "prepad_bos": False,
    "append_eos": True,
    "padding_token": "<pad>",
    "pad_to_max_length": False,
}
# ml-mdm's --model names and how many nested UNets each builds.
MODEL_LEVELS = {"unet": 1, "nested_unet": 2, "nested2_unet": 3, "nested3_unet": 4, "nested4_unet": 5}
# ml-mdm's enum members -> our names.
SCHEDULES = {"DEEPFLOYD": "squaredcos", "COSINE": "logsnr_cosine", "DDPM": "linear"}
PREDICTIONS = {"V_PREDICTION": "v", "DDPM": "eps", "DDIM": "eps"}
THRESHOLDS = {
    # ml-mdm threshold_function -> our sample.threshold, threshold_percentile, threshold_max
    # (ml-mdm's samplers.py: DYNAMIC takes the 99.5th percentile, s capped at 100; DYNAMIC_IF the 95th, at 1.5).
    "CLIP": ("clip", None, None),
    "NONE": ("none", None, None),
    "DYNAMIC": ("dynamic", 0.995, 100.0),
    "DYNAMIC_IF": ("dynamic_if", 0.95, 1.5),
}
# ml-mdm's web demo: 50 / 100 / 250 steps for 64 / 256 / 1024 pixels, guidance 7.5.
DEMO_STEPS = {64: 50, 256: 100, 1024: 250}
DEMO_GUIDANCE = 7.5
