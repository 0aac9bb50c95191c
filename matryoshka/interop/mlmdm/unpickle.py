"""Read ml-mdm weight files without running any code stored in them.

ml-mdm saves ``vis_model_*.pth`` with ``torch.save`` as
``{"state_dict": ..., "batch_num": ..., "loss": ..., "args": argparse.Namespace}``.
The ``args`` namespace pickles ml-mdm's configuration dataclasses and enums under the
module names of the time (``samplers.SamplerConfig``, ``models.unet.UNetConfig``...),
so a plain ``torch.load`` needs those modules importable, and an unrestricted
``torch.load`` of a file from the internet can run arbitrary code.

Here the file goes through torch's ``weights_only`` unpickler, which only rebuilds
tensors and plain containers. Before loading, the pickle's global references are
listed without executing anything (``torch.serialization.get_unsafe_globals_in_checkpoint``):

* names from ml-mdm's own modules, ``argparse.Namespace``, ``pathlib`` paths and numpy
  scalars are admitted as *inert records* (:class:`PickledRecord`): a record keeps the
  constructor arguments and saved state and never imports or calls the real class;
* anything else (``os.system``, ``builtins.eval``, ``subprocess.Popen``...) refuses the
  whole file with :class:`UnsafeCheckpointError`; nothing from it has run.

Also accepted: a plain state-dict file (``torch.save(model.state_dict())``), a
``{"state_dict": ...}`` file without ``args``, and a safetensors file with ml-mdm's
parameter names. The diffusers community port's safetensors use a different module tree
and are referred to ``mdm convert diffusers-mdm`` (:mod:`matryoshka.interop.diffusers_mdm`).
"""

from __future__ import annotations

import difflib
import os
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointFormatError, UnsafeCheckpointError

__all__ = [
    "LoadedWeights",
    "PickledRecord",
    "read_weights",
    "to_plain",
]


# ----------------------------------------------------------------------------- records

# Top-level module names under which ml-mdm's classes were pickled: the package itself
# and the old flat names that ml-mdm's fix_old_checkpoints.py aliases.
_MLMDM_MODULES = frozenset(
    {
        "ml_mdm",
        "config",
        "reader",
        "models",
        "diffusion",
        "samplers",
        "language_models",
        "distributed",
        "unet",
        "nested_unet",
        "helpers",
        "trainer",
        "lr_scaler",
    }
)
# Other plain-data classes an argparse namespace may hold.
_EXACT_RECORDS = frozenset(
    {
        "argparse.Namespace",
        "pathlib.Path",
        "pathlib.PosixPath",
        "pathlib.WindowsPath",
        "pathlib.PurePath",
        "pathlib.PurePosixPath",
        "pathlib.PureWindowsPath",
        "numpy.dtype",
        "numpy.ndarray",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
    }
)

# ml-mdm's enums pickle as ``EnumClass(value)``; their members, for readable records.
_MLMDM_ENUMS = {
    "ScheduleType": {0: "COSINE", 2: "DDPM", 3: "DEEPFLOYD", 4: "SIGMOID"},
    "PredictionType": {3: "DDPM", 4: "DDIM", 5: "V_PREDICTION"},
    "ThresholdType": {0: "NONE", 1: "CLIP", 2: "DYNAMIC", 3: "DYNAMIC_IF"},
}


def _admitted(qualified: str) -> bool:
    if qualified in _EXACT_RECORDS:
        return True
    if qualified.startswith("numpy.dtypes.") and qualified.endswith("DType"):
        return True
    return qualified.split(".", 1)[0] in _MLMDM_MODULES


class PickledRecord:
    """Stand-in for an object whose class was not imported: name, arguments and state only.

    Subclasses are created per pickled class name (``pickled_name``). Constructing or
    rebuilding a record stores what the pickle passed and does nothing else.
    """

    pickled_name: str = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledRecord:
        record = object.__new__(cls)
        record.__dict__["args"] = args
        record.__dict__["state"] = None
        return record

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"<record {self.pickled_name} args={self.args!r} state={self.state!r}>"


def _record_class(qualified: str) -> type[PickledRecord]:
    name = qualified.rsplit(".", 1)[-1]
    return type(name, (PickledRecord,), {"pickled_name": qualified, "__module__": __name__})


def _numpy_scalar(record: PickledRecord) -> Any:
    """Decode ``numpy.core.multiarray.scalar(dtype, bytes)`` for the common numeric dtypes."""
    if len(record.args) != 2 or not isinstance(record.args[0], PickledRecord):
        return None
    dtype, raw = record.args
    code = dtype.args[0] if dtype.args else None
    order = "<"
    if isinstance(dtype.state, tuple) and len(dtype.state) > 1 and dtype.state[1] in ("<", ">"):
        order = dtype.state[1]
    formats = {"f8": "d", "f4": "f", "i8": "q", "i4": "i", "u8": "Q", "u4": "I", "b1": "?"}
    if isinstance(raw, str):  # protocol-2 pickles of bytes written under encoding="latin1"
        raw = raw.encode("latin1")
    if code in formats and isinstance(raw, bytes) and len(raw) == struct.calcsize(formats[code]):
        return struct.unpack(order + formats[code], raw)[0]
    return None


def to_plain(value: Any, _depth: int = 0) -> Any:
    """Records and containers as plain Python (str, numbers, lists, dicts), for YAML and ``state.pt``.

    Dataclass and namespace records become dicts of their fields; ml-mdm enums become their
    member names; numpy scalars become numbers; tensors with one element become numbers
    and larger ones a short description.
    """
    if _depth > 50:
        return "<nested too deep>"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else f"<tensor {tuple(value.shape)} {value.dtype}>"
    if isinstance(value, Mapping):
        return {str(k): to_plain(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_plain(v, _depth + 1) for v in value]
    if isinstance(value, PickledRecord):
        cls_name = value.pickled_name.rsplit(".", 1)[-1]
        if cls_name in _MLMDM_ENUMS and len(value.args) == 1:
            return _MLMDM_ENUMS[cls_name].get(value.args[0], value.args[0])
        if value.pickled_name.endswith("multiarray.scalar"):
            number = _numpy_scalar(value)
            if number is not None:
                return number
        if value.pickled_name.startswith("pathlib.") and all(isinstance(a, str) for a in value.args):
            # Joined as text, not rebuilt with pathlib, so a Windows path saved on Windows reads as written.
            return os.path.join(*value.args) if value.args else ""
        state = value.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], Mapping):
            state = state[0]  # (dict, slots) form
        if isinstance(state, Mapping):
            return {str(k): to_plain(v, _depth + 1) for k, v in state.items()}
        if value.args:
            return {"__class__": value.pickled_name, "args": to_plain(list(value.args), _depth + 1)}
        return {"__class__": value.pickled_name}
    return repr(value)


# ----------------------------------------------------------------------------- reading


@dataclass
class LoadedWeights:
    """What a weight file holds, in ml-mdm's parameter names."""

    tensors: dict[str, torch.Tensor]
    kind: str
    """``"mlmdm-checkpoint"``, ``"state-dict"`` or ``"safetensors"``."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Plain metadata next to the state dict (``batch_num``, ``loss``...)."""
    args: dict[str, Any] | None = None
    """ml-mdm's training arguments (plain form of its ``argparse.Namespace``), if saved."""
    records: list[str] = field(default_factory=list)
    """Class names that were read as inert records."""
    notes: list[str] = field(default_factory=list)


_ZIP_MAGIC = b"PK\x03\x04"


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 0 < length <= size - 8 and head[8:9] == b"{"


def _diffusers_layout(keys: list[str]) -> bool:
    markers = ("transformer_blocks.", "time_embedding.linear_1", "time_emb_proj", "conv_norm_out", "attn1.to_")
    return any(marker in key for key in keys for marker in markers)


def read_weights(path: str | os.PathLike) -> LoadedWeights:
    """Read an ml-mdm ``.pth`` (with or without its wrapper dict) or a safetensors file.

    Raises FileNotFoundError, :class:`UnsafeCheckpointError` (code references; nothing
    executed) or :class:`CheckpointFormatError` (not a recognisable weight file).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {file}")
    size = file.stat().st_size
    with file.open("rb") as handle:
        head = handle.read(16)
    if _looks_like_safetensors(head, size):
        return _read_safetensors(file)
    return _read_torch(file, zipped=head.startswith(_ZIP_MAGIC))


def _read_safetensors(file: Path) -> LoadedWeights:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = list(handle.keys())
            metadata = handle.metadata() or {}
            if _diffusers_layout(keys):
                example = next(k for k in keys if _diffusers_layout([k]))
                raise CheckpointFormatError(
                    f"{file} uses the diffusers module layout (e.g. '{example}'), "
                    "as in the diffusers community port tolgacangoz/matryoshka-diffusion-models: convert it with "
                    "`mdm convert diffusers-mdm --model <its nesting_level directory>` (see docs/mlmdm.md)"
                )
            tensors = {key: handle.get_tensor(key) for key in keys}
    except SafetensorError as error:
        raise CheckpointFormatError(f"cannot read safetensors file {file}: {error}") from error
    return LoadedWeights(tensors, "safetensors", extras={"metadata": dict(metadata)})


def _read_torch(file: Path, zipped: bool) -> LoadedWeights:
    from pickle import UnpicklingError

    records: list[str] = []
    allowed: list[tuple[type, str]] = []
    if zipped:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
        except Exception as error:  # a corrupt archive or pickle: torch raises many kinds
            raise CheckpointFormatError(f"cannot read {file} as a torch checkpoint: {error}") from error
        refused = sorted(name for name in names if not _admitted(name))
        if refused:
            raise UnsafeCheckpointError(
                f"refusing to load {file}: its pickle references {', '.join(refused)}, which "
                f"{'is' if len(refused) == 1 else 'are'} neither tensors nor ml-mdm configuration classes and "
                "could run code when unpickled. Nothing from the file was executed. If you trust the file, "
                "re-save just its tensors (torch.save(checkpoint['state_dict'], 'weights.pth')) and convert that."
            )
        for name in names:
            allowed.append((_record_class(name), name))
            records.append(name)
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                obj = torch.load(str(file), map_location="cpu", weights_only=True, mmap=zipped)
            except RuntimeError as error:
                if not zipped or "mmap" not in str(error):
                    raise
                obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except UnpicklingError as error:
        # Only reachable for non-zip (legacy) pickles, whose globals cannot be listed first.
        raise UnsafeCheckpointError(
            f"refusing to load {file}: torch's weights-only unpickler rejected it ({_reason(error)}). "
            "Nothing from the file was executed."
        ) from error
    except Exception as error:  # a corrupt or unsupported file: torch raises many kinds
        raise CheckpointFormatError(f"cannot read {file} as a torch checkpoint: {error}") from error
    return _unwrap(obj, file, records)


def _reason(error: Exception) -> str:
    """The informative line of torch's long weights-only error message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line or "unsupported" in line:
            return line.rstrip(".")
    return lines[0].rstrip(".") if lines else type(error).__name__


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _unwrap(obj: Any, file: Path, records: list[str]) -> LoadedWeights:
    notes: list[str] = []
    if isinstance(obj, Mapping) and "state_dict" in obj:
        state = obj["state_dict"]
        if not _is_state_dict(state):
            bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)] if isinstance(state, Mapping) else []
            detail = f" (non-tensor entries: {', '.join(map(str, bad[:5]))})" if bad else ""
            raise CheckpointFormatError(f"{file}: 'state_dict' is not a mapping of names to tensors{detail}")
        extras = {str(k): to_plain(v) for k, v in obj.items() if k not in ("state_dict", "args")}
        args = to_plain(obj.get("args")) if obj.get("args") is not None else None
        if args is not None and not isinstance(args, dict):
            notes.append(f"ignored 'args' of unexpected form {type(obj.get('args')).__name__}")
            args = None
        tensors, kind = dict(state), "mlmdm-checkpoint"
    elif _is_state_dict(obj):
        tensors, kind, extras, args = dict(obj), "state-dict", {}, None
    else:
        keys = list(obj)[:10] if isinstance(obj, Mapping) else []
        hint = f" (top-level keys: {', '.join(map(str, keys))})" if keys else f" (got {type(obj).__name__})"
        near = difflib.get_close_matches("state_dict", [str(k) for k in keys], n=1)
        extra = f"; did you mean '{near[0]}'?" if near else ""
        raise CheckpointFormatError(
            f"{file} holds neither an ml-mdm checkpoint ({{'state_dict': ...}}) nor a plain state dict{hint}{extra}"
        )
    # A state dict saved from a DistributedDataParallel wrapper: drop the common prefix.
    if tensors and all(key.startswith("module.") for key in tensors):
        tensors = {key[len("module.") :]: value for key, value in tensors.items()}
        notes.append("removed the 'module.' prefix (DistributedDataParallel) from every parameter name")
    return LoadedWeights(tensors, kind, extras, args, sorted(set(records)), notes)
