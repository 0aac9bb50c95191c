"""Converting an ml-mdm checkpoint and its config into our checkpoint directory, in one call."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...config.run import RunConfig
from .config_mapping import MlmdmConversion, run_config_from_mlmdm
from .errors import MlmdmConfigError
from .unet_config import checkpoint_text_dim
from .unpickle import LoadedWeights, read_weights, to_plain
from .weights import convert_state_dict
from .writer import prepare_out, write_checkpoint
from .yaml_config import read_mlmdm_yaml

__all__ = ["ConversionResult", "convert_mlmdm"]


@dataclass
class ConversionResult:
    """What :func:`convert_mlmdm` wrote."""

    out: Path
    config: RunConfig
    num_parameters: int
    step: int
    """ml-mdm's ``batch_num`` (0 when the file does not record it)."""
    notes: list[str]
    sampling: dict[str, Any]
    files: list[str]
    """Names of the files written in ``out``."""


def _saved_args(loaded: LoadedWeights, checkpoint: Path) -> Mapping[str, Any]:
    """The ml-mdm config saved in the checkpoint, for a conversion without a YAML file."""
    if not loaded.args:
        raise MlmdmConfigError(
            f"{checkpoint} holds no ml-mdm training arguments; pass its YAML config (--config cc12m_256x256.yaml)"
        )
    return loaded.args


def _step(extras: Mapping[str, Any]) -> int:
    step = extras.get("batch_num")
    return int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else 0


def _source_record(
    checkpoint: Path,
    loaded: LoadedWeights,
    config_source: str,
    conversion: MlmdmConversion,
    notes: list[str],
    raw: Mapping[str, Any],
) -> dict[str, Any]:
    """Where the weights came from, kept in ``state.pt`` (plain values only, so it loads with weights_only)."""
    return {
        "format": "ml-mdm",
        "checkpoint": str(checkpoint),
        "checkpoint_kind": loaded.kind,
        "config": config_source,
        "extras": to_plain(loaded.extras),
        "inert_records": list(loaded.records),
        "sampling": conversion.sampling,
        "text_encoder": conversion.text_encoder,
        "notes": list(notes),
        "mlmdm_config": to_plain(dict(raw)),
    }


def convert_mlmdm(
    checkpoint: str | os.PathLike,
    config: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    state_dict_only: bool = False,
    text_dim: int | None = None,
    resolution: int | None = None,
    strict_training: bool = True,
) -> ConversionResult:
    """Convert an ml-mdm checkpoint (``vis_model.pth``) and its YAML config into ``out``.

    ``out`` receives our checkpoint directory: ``model.safetensors`` and
    ``ema.safetensors`` (the same weights, hard-linked when possible: ml-mdm's
    ``vis_model`` files hold the EMA), ``state.pt`` (step, number of levels and a record
    of the source: ml-mdm options, sampling settings, text encoder, notes) and
    ``config.yaml``. With ``state_dict_only`` only ``model.safetensors`` and
    ``config.yaml`` are written (weights for your own code; not a loadable checkpoint).
    Without ``config`` the ``args`` saved in the checkpoint are used.

    Everything is written to a temporary directory next to ``out`` and renamed at the
    end, so a failure leaves nothing behind.
    """
    checkpoint = Path(checkpoint).expanduser()
    out = Path(out).expanduser()
    if not checkpoint.is_file():
        raise FileNotFoundError(f"ml-mdm checkpoint not found: {checkpoint}")
    prepare_out(out)
    notes: list[str] = []
    raw: Mapping[str, Any] | None = None
    if config is not None:
        # Read before the weights, so that a bad config fails without loading gigabytes.
        raw, notes = read_mlmdm_yaml(config)
    loaded = read_weights(checkpoint)
    notes.extend(loaded.notes)
    if raw is None:
        raw = _saved_args(loaded, checkpoint)
        config_source = f"arguments saved in {checkpoint.name}"
    else:
        config_source = str(Path(config).expanduser())
    name = Path(config).stem if config is not None else checkpoint.stem
    saved_model = loaded.args.get("text_model") if loaded.args else None
    conversion = run_config_from_mlmdm(
        raw,
        text_dim=text_dim,
        resolution=resolution,
        strict_training=strict_training,
        name=f"{name}-converted",
        checkpoint_text_dim=checkpoint_text_dim(loaded.tensors),
        checkpoint_text_model=str(saved_model) if saved_model else None,
    )
    notes.extend(conversion.notes)
    tensors = convert_state_dict(loaded.tensors, conversion.config.model, str(checkpoint))
    step = _step(loaded.extras)
    state = None
    if not state_dict_only:
        source = _source_record(checkpoint, loaded, config_source, conversion, notes, raw)
        state = {"step": step, "num_levels": conversion.config.model.num_levels, "source": source}
    files = write_checkpoint(out, tensors, conversion.config, step, state)
    return ConversionResult(
        out=out,
        config=conversion.config,
        num_parameters=sum(t.numel() for t in tensors.values()),
        step=step,
        notes=notes,
        sampling=conversion.sampling,
        files=files,
    )
