"""Convert Apple ml-mdm checkpoints and YAML configs into our checkpoint format.

    from matryoshka.interop.mlmdm import convert_mlmdm
    convert_mlmdm("vis_model.pth", "cc12m_256x256.yaml", "converted/mlmdm-256")

    from matryoshka.pipeline import load_pipeline
    pipe = load_pipeline("converted/mlmdm-256")   # model, process and config, ready to sample

The pieces, usable on their own:

* :func:`read_mlmdm_yaml` (:mod:`.yaml_config`) reads ml-mdm's YAML as ml-mdm does
  (PyYAML, the last of duplicated keys wins) and reports the duplicates;
* :func:`run_config_from_mlmdm` (:mod:`.config_mapping`, with :mod:`.unet_config` and
  :mod:`.diffusion_mapping`) maps an ml-mdm config (a YAML mapping, or the ``args`` saved
  in a checkpoint) to our :class:`RunConfig`, refusing every option that would make our
  model or sampler compute something different from ml-mdm;
* :func:`read_weights` (:mod:`.unpickle`) reads a weight file without running code stored in it;
* :func:`map_mlmdm_keys` (:mod:`.weights`) checks a state dict's names and shapes against
  the model (without materialising tensors) and :func:`convert_state_dict` renames the
  tensors (:mod:`.keys` holds the name correspondence);
* :func:`convert_mlmdm` (:mod:`.convert`, writing through :mod:`.writer`) does it all and
  writes a checkpoint directory atomically.

ml-mdm's option defaults live in :mod:`.defaults`, the typed option parsers in :mod:`.values`.
docs/mlmdm.md describes the mapping, the sampling semantics and the differences.
"""

from __future__ import annotations

from .config_mapping import MlmdmConversion, run_config_from_mlmdm
from .convert import ConversionResult, convert_mlmdm
from .defaults import TEXT_ENCODER_DIMS
from .errors import CheckpointFormatError, MlmdmConfigError, MlmdmError, MlmdmMismatchError, UnsafeCheckpointError
from .keys import from_mlmdm_key, to_mlmdm_key
from .unpickle import LoadedWeights, PickledRecord, read_weights, to_plain
from .weights import convert_state_dict, expected_shapes, map_mlmdm_keys
from .yaml_config import read_mlmdm_yaml

__all__ = [
    "TEXT_ENCODER_DIMS",
    "CheckpointFormatError",
    "ConversionResult",
    "LoadedWeights",
    "MlmdmConfigError",
    "MlmdmConversion",
    "MlmdmError",
    "MlmdmMismatchError",
    "PickledRecord",
    "UnsafeCheckpointError",
    "convert_mlmdm",
    "convert_state_dict",
    "expected_shapes",
    "from_mlmdm_key",
    "map_mlmdm_keys",
    "read_mlmdm_yaml",
    "read_weights",
    "run_config_from_mlmdm",
    "to_mlmdm_key",
    "to_plain",
]
