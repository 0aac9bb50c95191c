"""A nesting-level directory of the port -> our checkpoint directory."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ...config.run import DiffusionConfig, RunConfig, SampleConfig, TextConfig
from ...data.config import DataConfig
from ...models.config import ModelConfig
from ..mlmdm.defaults import DEMO_GUIDANCE, DEMO_STEPS, TEXT_ENCODER_DIMS
from ..mlmdm.writer import prepare_out, write_checkpoint
from .config import DiffusersMdmError, model_from_diffusers
from .weights import _weight_file, convert_port_state_dict, read_port_weights


@dataclass
class PortConversion:
    """What :func:`convert_diffusers_mdm` wrote."""

    out: Path
    config: RunConfig
    num_parameters: int
    files: list[str]
    notes: list[str]


def _run_config(model: ModelConfig, resolution: int, name: str, notes: list[str]) -> RunConfig:
    """ml-mdm's diffusion and demo sampling, which the port reproduces (its MatryoshkaDDIMScheduler)."""
    encoder = next((name for name, dim in TEXT_ENCODER_DIMS.items() if dim == model.text_dim and "flan" in name), None)
    if encoder is None:
        encoder = "google/flan-t5-xl"
        notes.append(f"no FLAN-T5 encoder gives {model.text_dim}-wide tokens: set text.encoder in config.yaml")
    try:
        return RunConfig(
            run_dir=f"runs/{name}",
            model=model,
            # The port's pipeline sets schedule_shifted_power 2 for three levels, else 1, as ml-mdm's configs;
            # it calls the UNet at t - 1 on ml-mdm's step grid ("matryoshka_style"), as our "mlmdm" spacing.
            diffusion=DiffusionConfig(
                schedule="squaredcos",
                num_steps=1000,
                prediction="v",
                loss_target="eps",
                shift_power=2.0 if model.num_levels == 3 else 1.0,
            ),
            data=DataConfig(source="mlmdm-tsv", path="training_0.tsv", resolution=resolution, captions=True),
            sample=SampleConfig(
                sampler="ddim",
                steps=DEMO_STEPS.get(resolution, 100),
                spacing="mlmdm",
                num=4,
                guidance=DEMO_GUIDANCE,
                negative_prompt="",
                eta=0.0,
                threshold="clip",
            ),
            text=TextConfig(encoder=encoder, max_length=128, mlmdm_compat="sample"),
        )
    except ValueError as error:
        raise DiffusersMdmError(f"the port's model gives no valid run config: {error}") from error


def convert_diffusers_mdm(
    model_path: str | os.PathLike, out: str | os.PathLike, *, resolution: int | None = None
) -> PortConversion:
    """Convert one nesting level of the port (its directory, or its weight file) into our checkpoint at ``out``.

    ``resolution`` is the top level's side (default: 64 at the innermost level, nested by the
    model's ratio). Everything is written to a temporary directory renamed at the end: a
    failure leaves nothing behind.
    """
    path, out = Path(model_path).expanduser(), Path(out).expanduser()
    weights, config_file = _weight_file(path)
    prepare_out(out)
    try:
        options = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DiffusersMdmError(f"{config_file} is not valid JSON: {error}") from error
    if not isinstance(options, Mapping):
        raise DiffusersMdmError(f"{config_file} must hold a JSON object")
    notes: list[str] = []
    model, flips = model_from_diffusers(options, notes)
    # The port's models are ml-mdm's: a 64-pixel innermost UNet, nested by the outer UNets' ratio.
    top = resolution or 64 * model.nest_ratio ** (model.num_levels - 1)
    config = _run_config(model, top, f"{config_file.parent.name}-converted", notes)
    tensors = convert_port_state_dict(read_port_weights(weights), model, flips, str(weights))
    source = {
        "format": "diffusers-mdm",
        "checkpoint": str(weights),
        "config": str(config_file),
        "diffusers_config": options,
        "notes": list(notes),
    }
    state = {"step": 0, "num_levels": model.num_levels, "source": source}
    files = write_checkpoint(out, tensors, config, 0, state, source="diffusers-mdm")
    return PortConversion(out, config, sum(t.numel() for t in tensors.values()), files, notes)
