"""Tokenizers: exact round trips, offsets that point at the right characters, plain-text
encoding of marker strings, SentencePiece save/reload and parity with the tokenizers
library on a locally trained tokenizer.json."""

import json

import numpy as np
import pytest
import tokenizers as hf

from rlhf_jax.data.tokenizers import (
    ROLE_MARKERS,
    ByteTokenizer,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Human: what is the capital of France? Assistant: Paris is the capital.",
    "Grüße aus Köln, naïve café, déjà vu.",
    "東京は日本の首都です。",
    "numbers 12345 and symbols #$%&*()",
] * 8

TEXTS = [
    "hello world",
    "Grüße, café — déjà vu!",
    "東京 and an emoji 😀 and a new one 🦜",
    "  leading and trailing spaces  \n\ttabs\n",
    "",
    "a",
]

HF_SPECIALS = ["<pad>", "<s>", "</s>", *ROLE_MARKERS.values()]


def train_hf_dir(directory, specials=HF_SPECIALS, config=True):
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    if config:
        (directory / "tokenizer_config.json").write_text(
            json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>"})
        )
    return directory


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sp")
    SentencePieceTokenizer.train(CORPUS, directory, vocab_size=400)
    return directory


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return train_hf_dir(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module", params=["byte", "sentencepiece", "huggingface"])
def tokenizer(request, sp_dir, hf_dir):
    if request.param == "byte":
        return ByteTokenizer()
    if request.param == "sentencepiece":
        return SentencePieceTokenizer(sp_dir)
    return HuggingFaceTokenizer(hf_dir)


def test_satisfies_protocol_and_special_ids_are_distinct(tokenizer):
    assert isinstance(tokenizer, Tokenizer)
    specials = [tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, *tokenizer.role_ids.values()]
    assert len(set(specials)) == len(specials) == 6
    assert set(tokenizer.role_ids) == {"system", "human", "assistant"}
    assert all(0 <= i < tokenizer.vocab_size for i in specials)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_exact(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32
    assert np.all((ids >= 0) & (ids < tokenizer.vocab_size))
    assert tokenizer.decode(ids) == text


def test_marker_strings_in_text_are_plain_text(tokenizer):
    text = "fake <|assistant|> marker <|human|>"
    ids = tokenizer.encode(text)
    specials = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, *tokenizer.role_ids.values()}
    assert not specials & set(ids.tolist())
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS)
def test_offsets_point_at_the_characters_each_token_spells(tokenizer, text):
    ids, offsets = tokenizer.encode_with_offsets(text)
    np.testing.assert_array_equal(ids, tokenizer.encode(text))
    assert offsets.shape == (len(ids), 2)
    assert np.all(
        (offsets[:, 0] >= 0) & (offsets[:, 0] < offsets[:, 1]) & (offsets[:, 1] <= len(text))
    )
    assert np.all(np.diff(offsets[:, 0]) >= 0)
    # Tokens are grouped until they decode to whole characters (a byte-level token may
    # hold part of a multi-byte character); each group must spell exactly the characters
    # its offsets cover, and the groups must tile the text.
    group, cursor = [], 0
    for k in range(len(ids)):
        group.append(k)
        piece = tokenizer.decode(ids[group])
        if "\ufffd" in piece:
            continue
        start, end = offsets[group, 0].min(), offsets[group, 1].max()
        assert (start, text[start:end]) == (cursor, piece)
        group, cursor = [], end
    assert group == [] and cursor == len(text)


def test_partial_utf8_decodes_with_replacement(tokenizer):
    ids = tokenizer.encode("🦜")
    assert len(ids) == 4  # four bytes, none merged: the emoji is not in any corpus
    assert tokenizer.decode(ids[:1]) == "\ufffd"
    assert tokenizer.decode(ids[:3]).strip("\ufffd") == ""


def test_decode_drops_or_renders_special_ids(tokenizer):
    body = tokenizer.encode("hi").tolist()
    ids = [tokenizer.bos_id, tokenizer.role_ids["human"], *body, tokenizer.eos_id, tokenizer.pad_id]
    assert tokenizer.decode(ids) == "hi"
    assert tokenizer.decode(ids, skip_special=False) == "<bos><|human|>hi<eos><pad>"


def test_byte_ids_are_utf8_bytes_after_six_specials():
    text = "Köln 😀"
    np.testing.assert_array_equal(
        ByteTokenizer().encode(text), np.frombuffer(text.encode(), np.uint8) + 6
    )
    assert ByteTokenizer().decode([0xFF + 6, ord("a") + 6]) == "\ufffda"


def test_sentencepiece_reload_gives_identical_ids(sp_dir):
    first, again = (
        SentencePieceTokenizer(sp_dir),
        SentencePieceTokenizer(sp_dir / "tokenizer.model"),
    )
    for text in TEXTS + CORPUS[:5]:
        np.testing.assert_array_equal(first.encode(text), again.encode(text))
    assert first.role_ids == again.role_ids and first.vocab_size == again.vocab_size
    assert (first.pad_id, first.bos_id, first.eos_id) == (0, 2, 3)


def test_sentencepiece_missing_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model"):
        SentencePieceTokenizer(tmp_path)


def test_huggingface_matches_the_library_and_its_config(hf_dir):
    ours = HuggingFaceTokenizer(hf_dir)
    library = hf.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for text in TEXTS + CORPUS[:5]:
        encoding = library.encode(text, add_special_tokens=False)
        ids, offsets = ours.encode_with_offsets(text)
        assert ids.tolist() == encoding.ids
        assert [tuple(o) for o in offsets.tolist()] == encoding.offsets
    assert ours.bos_id == library.token_to_id("<s>")
    assert ours.eos_id == library.token_to_id("</s>")
    assert ours.pad_id == library.token_to_id("<pad>")
    assert ours.role_ids == {r: library.token_to_id(m) for r, m in ROLE_MARKERS.items()}
    assert HuggingFaceTokenizer(hf_dir, pad_token="</s>").pad_id == ours.eos_id  # argument wins


def test_huggingface_without_role_tokens_raises_or_appends(tmp_path):
    directory = train_hf_dir(tmp_path / "plain", specials=["<|endoftext|>"], config=False)
    with pytest.raises(ValueError, match="no eos token"):
        HuggingFaceTokenizer(directory)
    with pytest.raises(ValueError, match="add_missing_role_tokens"):
        HuggingFaceTokenizer(directory, eos_token="<|endoftext|>")
    base = hf.Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size()
    grown = HuggingFaceTokenizer(directory, eos_token="<|endoftext|>", add_missing_role_tokens=True)
    assert grown.vocab_size == base + 3
    assert sorted(grown.role_ids.values()) == [base, base + 1, base + 2]
    assert grown.bos_id is None and grown.pad_id == grown.eos_id
    assert grown.decode(grown.encode("café 🦜")) == "café 🦜"
