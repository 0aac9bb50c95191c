"""A disk cache of text embeddings, computed once per unique caption and reused across runs and ranks.

Layout: ``<directory>/<encoder slug>/shard-<digest>.safetensors``. Each shard holds, for each
of its captions (key ``k`` = a hash of the encoder id and the caption):

* ``k.tokens``: (L, dim) token embeddings up to the caption's last real token,
* ``k.mask``: (L,) bool,
* ``k.pooled``: (dim,),

stored in the cache's ``dtype`` (default float16), and the metadata ``format``,
``encoder_id`` and ``dim``. Shards are written to a temporary file in the same folder and
renamed into place, so a reader never sees a partial shard, and two processes filling
the cache at once at worst compute some captions twice (either copy is then used).
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .base import TextEmbedding, TextEncoder

FORMAT = "matryoshka-text-cache/1"
_Entry = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # tokens (L, D), mask (L,), pooled (D,) in storage dtype


def _slug(encoder_id: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._@+-]+", "_", encoder_id).strip("_")[-60:]
    return f"{readable}-{hashlib.sha256(encoder_id.encode()).hexdigest()[:8]}"


def _write_shard(folder: Path, entries: dict[str, _Entry], metadata: dict[str, str]) -> Path:
    """Write ``entries`` as one shard, atomically (temporary file + fsync + rename)."""
    from safetensors.torch import save_file

    tensors = {}
    for key, (tokens, mask, pooled) in entries.items():
        tensors[f"{key}.tokens"] = tokens.contiguous()
        tensors[f"{key}.mask"] = mask.contiguous()
        tensors[f"{key}.pooled"] = pooled.contiguous()
    digest = hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()[:24]
    final = folder / f"shard-{digest}.safetensors"
    temporary = folder / f".tmp-{digest}-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
    try:
        save_file(tensors, str(temporary), metadata=metadata)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, final)
    finally:
        if temporary.exists():
            temporary.unlink()
    return final


def _flush(folder: Path, pending: dict[str, _Entry], metadata: dict[str, str]) -> None:
    """Last-chance write of buffered captions (garbage collection or interpreter exit)."""
    if pending:
        try:
            if folder.is_dir():
                _write_shard(folder, dict(pending), metadata)
        except Exception as error:  # never raise from a finalizer; the captions are just recomputed later
            warnings.warn(
                f"text embedding cache: could not write {len(pending)} buffered captions to {folder}: {error}",
                stacklevel=2,
            )
        pending.clear()


class TextEmbeddingCache:
    """Text embeddings of captions, cached on disk under ``directory``.

    ``encoder``: the :class:`TextEncoder` that computes missing captions, or just its ``id``
    string to read a cache that was filled beforehand (then a missing caption is a
    ``KeyError``, and the encoder never has to be loaded). ``dtype``: storage type
    (float16 halves the size; use bfloat16 or float32 if values might exceed ±65504).
    Captions computed by :meth:`get` are buffered and written as one shard every
    ``shard_size`` captions, on :meth:`flush`, and when the cache is garbage collected or
    the interpreter exits. Up to ``memory_items`` loaded captions are kept in memory.

    The embedding of a caption is the same whichever batch it is requested in, and the same
    on first and later use (values go through the storage type before they are returned).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        encoder: TextEncoder | str,
        *,
        dtype: torch.dtype = torch.float16,
        shard_size: int = 1024,
        batch_size: int = 64,
        memory_items: int = 65536,
    ) -> None:
        if isinstance(encoder, TextEncoder):
            self.encoder: TextEncoder | None = encoder
            self.encoder_id = encoder.id
        elif isinstance(encoder, str):
            self.encoder = None
            self.encoder_id = encoder
        else:
            raise TypeError(f"encoder must be a TextEncoder or an encoder id string, got {type(encoder).__name__}")
        if not dtype.is_floating_point:
            raise ValueError(f"storage dtype must be a floating type, got {dtype}")
        self.dtype = dtype
        self.shard_size = max(1, int(shard_size))
        self.batch_size = max(1, int(batch_size))
        self.memory_items = max(0, int(memory_items))
        self.folder = Path(directory) / _slug(self.encoder_id)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, str] = {}  # key -> shard file name
        self._seen: set[str] = set()
        self._handles: dict[str, object] = {}
        self._memory: OrderedDict[str, _Entry] = OrderedDict()
        self.dim: int | None = self.encoder.dim if self.encoder is not None else None
        self._start_buffer()
        self.refresh()

    # ------------------------------------------------------------------ bookkeeping
    def _start_buffer(self) -> None:
        self._pending: dict[str, _Entry] = {}
        self._finalizer = weakref.finalize(self, _flush, self.folder, self._pending, self._metadata())

    def _metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "encoder_id": self.encoder_id, "dim": str(self.dim or 0)}

    def key(self, caption: str) -> str:
        """Cache key of a caption: a hash of the encoder id and the caption."""
        return hashlib.sha256(f"{self.encoder_id}\n{caption}".encode("utf-8", "surrogatepass")).hexdigest()[:32]

    def refresh(self) -> int:
        """Index shards written since the last look (e.g. by other processes); returns how many were new."""
        from safetensors import safe_open

        new = 0
        for path in sorted(self.folder.glob("shard-*.safetensors")):
            if path.name in self._seen:
                continue
            self._seen.add(path.name)
            try:
                with safe_open(str(path), framework="pt") as handle:
                    metadata = handle.metadata() or {}
                    names = list(handle.keys())
            except Exception as error:  # a foreign or damaged file: leave it alone
                warnings.warn(f"text embedding cache: skipping unreadable shard {path}: {error}", stacklevel=2)
                continue
            if metadata.get("format") != FORMAT or metadata.get("encoder_id") != self.encoder_id:
                warnings.warn(
                    f"text embedding cache: skipping {path}: written for {metadata.get('encoder_id')!r}", stacklevel=2
                )
                continue
            if self.dim is None and metadata.get("dim", "0") != "0":
                self.dim = int(metadata["dim"])
            elif self.dim is not None and metadata.get("dim") not in (None, "0", str(self.dim)):
                warnings.warn(
                    f"text embedding cache: skipping {path}: dim {metadata.get('dim')} != {self.dim}", stacklevel=2
                )
                continue
            for name in names:
                if name.endswith(".tokens"):
                    self._index.setdefault(name[: -len(".tokens")], path.name)
            new += 1
        return new

    def __len__(self) -> int:
        return len(self._index.keys() | self._pending.keys())

    def __contains__(self, caption: str) -> bool:
        key = self.key(caption)
        return key in self._index or key in self._pending

    def flush(self) -> None:
        """Write captions computed by :meth:`get` that are not on disk yet."""
        if self._pending:
            names = list(self._pending)
            path = _write_shard(self.folder, dict(self._pending), self._metadata())
            self._seen.add(path.name)
            for key in names:
                self._index.setdefault(key, path.name)
            self._pending.clear()

    def close(self) -> None:
        """Flush and release open shard files."""
        self.flush()
        self._handles.clear()

    def __getstate__(self) -> dict:
        self.flush()
        state = self.__dict__.copy()
        for name in ("_handles", "_pending", "_finalizer", "_memory"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._handles = {}
        self._memory = OrderedDict()
        self._start_buffer()

    # ------------------------------------------------------------------ computing
    def _encode(self, captions: Sequence[str]) -> dict[str, _Entry]:
        if self.encoder is None:
            raise KeyError(
                f"{len(captions)} caption(s) are not in the text embedding cache {self.folder} and no encoder was "
                f"given to compute them, e.g. {captions[0]!r}"
            )
        embedding = self.encoder.encode(list(captions), device="cpu")
        if self.dim is None:
            self.dim = embedding.dim
        elif embedding.dim != self.dim:
            raise ValueError(f"encoder gives {embedding.dim}-d tokens but the cache holds {self.dim}-d ones")
        tokens = embedding.tokens.to(self.dtype)
        pooled = embedding.pooled.to(self.dtype)
        if not (torch.isfinite(tokens).all() and torch.isfinite(pooled).all()):
            raise ValueError(
                f"text embeddings overflow the cache's {self.dtype}; use dtype=torch.bfloat16 or torch.float32"
            )
        entries = {}
        for row, caption in enumerate(captions):
            real = embedding.mask[row].nonzero()
            length = int(real.max()) + 1 if real.numel() else 1
            entries[self.key(caption)] = (
                tokens[row, :length].clone(),
                embedding.mask[row, :length].clone(),
                pooled[row].clone(),
            )
        return entries

    def _add_pending(self, entries: dict[str, _Entry]) -> None:
        self._pending.update(entries)
        if len(self._pending) >= self.shard_size:
            self.flush()

    def precompute(
        self,
        captions: Iterable[str],
        batch_size: int | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        progress: bool = True,
    ) -> int:
        """Compute and store every caption not cached yet; returns how many were computed.

        With several processes, pass ``rank``/``world_size`` so each computes its share, then
        synchronise (a barrier) before reading: :meth:`get` picks up the others' shards.
        Captions are encoded sorted by length, ``batch_size`` (default: the cache's) at a time.
        """
        from tqdm.auto import tqdm

        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        batch_size = max(1, int(batch_size or self.batch_size))
        self.refresh()
        share = list(dict.fromkeys(captions))[rank::world_size]  # split before filtering: ranks agree on shares
        todo = sorted(
            (c for c in share if self.key(c) not in self._index and self.key(c) not in self._pending), key=len
        )
        with tqdm(
            total=len(todo), desc=f"text embeddings {self.encoder_id}", unit="caption", disable=not progress
        ) as bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                self._add_pending(self._encode(chunk))
                bar.update(len(chunk))
        self.flush()
        return len(todo)

    # ------------------------------------------------------------------ reading
    def _load(self, key: str) -> _Entry:
        entry = self._pending.get(key)
        if entry is not None:
            return entry
        entry = self._memory.get(key)
        if entry is not None:
            self._memory.move_to_end(key)
            return entry
        from safetensors import safe_open

        name = self._index[key]
        handle = self._handles.get(name)
        if handle is None:
            handle = self._handles[name] = safe_open(str(self.folder / name), framework="pt")
        entry = (
            handle.get_tensor(f"{key}.tokens"),
            handle.get_tensor(f"{key}.mask"),
            handle.get_tensor(f"{key}.pooled"),
        )
        if self.memory_items:
            self._memory[key] = entry
            while len(self._memory) > self.memory_items:
                self._memory.popitem(last=False)
        return entry

    def get(self, captions: Sequence[str], device: torch.device | str | None = None) -> TextEmbedding:
        """Embeddings of ``captions`` (float32, padded to the longest in the batch), computing missing ones."""
        if isinstance(captions, str):
            raise TypeError("get takes a list of captions, not a single string")
        if len(captions) == 0:
            raise ValueError("get needs at least one caption")
        keys = [self.key(caption) for caption in captions]
        missing = {
            key: caption for key, caption in zip(keys, captions) if key not in self._pending and key not in self._index
        }
        if missing:
            self.refresh()
            missing = {key: caption for key, caption in missing.items() if key not in self._index}
        if missing:
            todo = list(missing.values())
            for start in range(0, len(todo), self.batch_size):
                self._add_pending(self._encode(todo[start : start + self.batch_size]))
        entries = [self._load(key) for key in keys]
        length = max(entry[0].shape[0] for entry in entries)
        dim = entries[0][0].shape[1]
        tokens = torch.zeros(len(entries), length, dim)
        mask = torch.zeros(len(entries), length, dtype=torch.bool)
        for row, (row_tokens, row_mask, _) in enumerate(entries):
            tokens[row, : row_tokens.shape[0]] = row_tokens.float()
            mask[row, : row_mask.shape[0]] = row_mask
        pooled = torch.stack([entry[2] for entry in entries]).float()
        embedding = TextEmbedding(tokens, mask, pooled)
        return embedding if device is None else embedding.to(device)
