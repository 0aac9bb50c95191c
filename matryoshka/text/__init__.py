"""Frozen text encoders for text-to-image MDM, and a disk cache of their embeddings. See docs/text.md.

``load_text_encoder("minilm")`` is the offline default (all-MiniLM-L6-v2, 384-d tokens);
any Hugging Face T5/FLAN-T5, CLIP or BERT-like encoder loads by hub id or local directory.
``transformers`` is only imported when an encoder is loaded.
"""

from .base import TextEmbedding, TextEncoder, masked_mean, null_mask_rows
from .cache import TextEmbeddingCache
from .hf import HFTextEncoder, T5TextEncoder, TextEncoderNotFound, load_minilm, load_text_encoder, minilm_path
from .mlmdm import MlmdmT5Tokenizer

__all__ = [
    "HFTextEncoder",
    "MlmdmT5Tokenizer",
    "T5TextEncoder",
    "TextEmbedding",
    "TextEmbeddingCache",
    "TextEncoder",
    "TextEncoderNotFound",
    "load_minilm",
    "load_text_encoder",
    "masked_mean",
    "minilm_path",
    "null_mask_rows",
]
