"""ml-mdm's T5 tokenisation, reproduced so that ml-mdm checkpoints see the tokens they were trained on.

ml-mdm does not use the SentencePiece/Hugging Face T5 tokenizer. It reads the T5 vocabulary
as a list of ``piece<TAB>log-probability`` lines (its ``data/t5.vocab``; the line number is
the token id, which matches T5's ids), puts every piece, with ``▁`` turned into a space,
into a byte trie, and picks for each caption the segmentation of least total cost
(cost of a piece = minus its log-probability). Its data reader, with the settings of its
CC12M configs (``prepad_caption_with_space``, ``append_eos``, ``padding_token: <pad>``,
``max_token_length: 128``):

* training reader: the caption is padded with one space on *both* sides (the trailing one
  works around an mlx-data issue), so tokens end with a ``▁`` piece before ``</s>``;
* sampling (``process_text``): one leading space only;
* bytes that no piece covers are skipped (``ignore_unk``), not mapped to ``<unk>``;
* no text normalisation (SentencePiece applies NFKC and collapses runs of spaces);
* ``</s>`` appended, batches padded with ``<pad>`` (id 0); the mask is ``token != <pad>``.

:class:`MlmdmT5Tokenizer` does the same. Differences from ml-mdm, all at the edges:

* captions longer than ``max_length`` tokens are truncated, keeping ``</s>`` last
  (ml-mdm's training reader drops such samples; its sampler cuts them without ``</s>``);
* a caption whose last bytes start a piece but complete none makes ml-mdm's tokenizer
  raise; here those bytes are dropped;
* equal-cost segmentations (practically only possible through zero-cost special pieces)
  may be broken differently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import torch

SPACE_MARK = "\u2581"  # SentencePiece's "▁"
MODES = ("train", "sample")


class _Node:
    __slots__ = ("children", "token")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.token = -1


class MlmdmT5Tokenizer:
    """Least-cost segmentation of UTF-8 bytes over a piece vocabulary, ml-mdm style.

    ``pieces``: (piece, log-probability) in token-id order, as in T5's vocabulary.
    ``mode``: "train" (caption padded with a space on both sides, as ml-mdm's training
    reader) or "sample" (leading space only, as ml-mdm's ``generate_*`` scripts).
    """

    def __init__(
        self,
        pieces: Sequence[tuple[str, float]],
        mode: str = "train",
        pad_token: str = "<pad>",
        eos_token: str = "</s>",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mlmdm tokenisation mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.root = _Node()
        self.costs: list[float] = []
        ids: dict[str, int] = {}
        for index, (piece, score) in enumerate(pieces):
            text = piece.replace(SPACE_MARK, " ")
            node = self.root
            for byte in text.encode("utf-8"):
                node = node.children.setdefault(byte, _Node())
            if node.token >= 0:
                raise ValueError(f"piece {piece!r} appears twice in the vocabulary (ids {node.token} and {index})")
            node.token = index
            self.costs.append(-float(score))
            ids[piece] = index
        if pad_token not in ids or eos_token not in ids:
            raise ValueError(f"the vocabulary lacks {pad_token!r} or {eos_token!r}")
        self.pad_id = ids[pad_token]
        self.eos_id = ids[eos_token]
        self.vocab_size = len(self.costs)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_vocab_file(cls, path: str | os.PathLike, mode: str = "train") -> MlmdmT5Tokenizer:
        """Read ml-mdm's vocabulary format: one ``piece<TAB>log-probability`` line per token id."""
        pieces = []
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, 1):
                line = line.rstrip()
                try:
                    piece, score = line.split(b"\t")
                    pieces.append((piece.decode("utf-8"), float(score)))
                except ValueError as error:
                    raise ValueError(f"{path}:{number}: expected 'piece<TAB>score', got {line[:80]!r}") from error
        return cls(pieces, mode=mode)

    @classmethod
    def from_hf_tokenizer(cls, tokenizer, mode: str = "train") -> MlmdmT5Tokenizer:
        """Take the pieces and scores of a Hugging Face T5 tokenizer's Unigram model.

        For FLAN-T5/T5 these are the same 32,100 entries, in the same order, as ml-mdm's
        ``t5.vocab`` (SentencePiece's 32,000 pieces, then ``<extra_id_99>`` … ``<extra_id_0>``).
        """
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(
                "mlmdm tokenisation needs a T5 tokenizer backed by the `tokenizers` library (a Unigram model)"
            )
        model = json.loads(backend.to_str())["model"]
        if model.get("type") != "Unigram":
            raise ValueError(
                f"mlmdm tokenisation needs a Unigram (SentencePiece) vocabulary, got {model.get('type')!r}"
            )
        pieces = [(piece, float(score)) for piece, score in model["vocab"]]
        return cls(
            pieces,
            mode=mode,
            pad_token=str(tokenizer.pad_token or "<pad>"),
            eos_token=str(tokenizer.eos_token or "</s>"),
        )

    # ------------------------------------------------------------------ tokenisation
    def segment(self, text: str) -> list[int]:
        """Least-cost token ids for ``text`` as given (no padding spaces, no ``</s>``)."""
        root, costs = self.root, self.costs
        # Boundaries between tokens: best cost to reach them and how (previous boundary, token).
        best = [0.0]
        back: list[tuple[int, int] | None] = [None]
        last = 0  # newest boundary
        active: list[tuple[_Node, int]] = [(root, 0)]  # (trie position, boundary it started at)
        for byte in text.encode("utf-8"):
            done: list[tuple[float, int, int]] = []
            ongoing: list[tuple[_Node, int]] = []
            for node, start in active:
                child = node.children.get(byte)
                if child is None:
                    continue
                if child.token >= 0:
                    done.append((best[start] + costs[child.token], start, child.token))
                if child.children:
                    ongoing.append((child, start))
            if not done and not ongoing:
                # No piece covers this byte: skip it, and restart from the newest boundary.
                active = [(root, last)]
                continue
            if done:
                cost, start, token = min(done)
                best.append(cost)
                back.append((start, token))
                last = len(best) - 1
                active = [(root, last), *ongoing]
            else:
                active = ongoing
        ids = []
        node = last
        while back[node] is not None:
            node, token = back[node]
            ids.append(token)
        return ids[::-1]

    def encode(self, caption: str, max_length: int | None = None) -> list[int]:
        """Token ids of one caption: padded with spaces per ``mode``, segmented, ``</s>`` appended,
        truncated to ``max_length`` keeping ``</s>``."""
        text = " " + caption + (" " if self.mode == "train" else "")
        ids = self.segment(text)
        if max_length is not None:
            if max_length < 1:
                raise ValueError("max_length must be at least 1")
            ids = ids[: max_length - 1]
        return ids + [self.eos_id]

    def __call__(self, captions: Iterable[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, mask) for a batch, padded with ``<pad>`` to the longest; mask = ids != pad."""
        rows = [self.encode(caption, max_length) for caption in captions]
        length = max((len(row) for row in rows), default=1)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, ids != self.pad_id
