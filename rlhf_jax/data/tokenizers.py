"""Tokenizers behind one interface.

Three implementations: bytes, a locally trained SentencePiece model, and a local Hugging
Face ``tokenizer.json``.

Every tokenizer maps plain text to ids and back, reports character offsets per token, and
exposes the special ids the chat template and batching need: ``pad_id``, ``bos_id`` (may be
``None``), ``eos_id`` and one id per chat role (``"system"``, ``"human"``, ``"assistant"``).

Contract shared by all three:

- ``encode`` treats its input as plain text: a marker string such as ``"<|human|>"``
  inside user text is encoded as ordinary characters, never as the special id, so data
  cannot forge role markers. Special ids are inserted only by the chat template.
- ``encode_with_offsets`` returns ``(ids, offsets)`` with ``offsets[i] = (start, end)``,
  character (not byte) positions in the input; a byte-level token that is part of a
  multi-byte character maps to that whole character.
- ``decode`` never raises on ids produced by the tokenizer: invalid UTF-8 byte sequences
  are replaced by U+FFFD. Special ids are dropped unless ``skip_special=False``, in which
  case they are rendered as their marker strings.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import sentencepiece as spm
import tokenizers as hf_tokenizers

ROLES = ("system", "human", "assistant")
ROLE_MARKERS = {"system": "<|system|>", "human": "<|human|>", "assistant": "<|assistant|>"}
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


@runtime_checkable
class Tokenizer(Protocol):
    """What the chat template, builders and batching need from a tokenizer."""

    @property
    def vocab_size(self) -> int:
        """Number of ids (every id is in ``[0, vocab_size)``)."""
        ...

    @property
    def pad_id(self) -> int:
        """Id used to fill padding positions."""
        ...

    @property
    def bos_id(self) -> int | None:
        """Id prepended to a rendered dialogue, or ``None`` if the vocabulary has none."""
        ...

    @property
    def eos_id(self) -> int:
        """Id appended after every assistant turn."""
        ...

    @property
    def role_ids(self) -> Mapping[str, int]:
        """Role name (``"system"``, ``"human"``, ``"assistant"``) -> marker id."""
        ...

    def encode(self, text: str) -> np.ndarray:
        """Plain text -> int32 ids ``[T]`` (no special ids)."""
        ...

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Plain text -> (int32 ids ``[T]``, int32 character offsets ``[T, 2]``)."""
        ...

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Ids -> text; invalid UTF-8 is replaced, special ids dropped or rendered."""
        ...


def _special_names(tok: Tokenizer) -> dict[int, str]:
    names = {tok.pad_id: PAD, tok.eos_id: EOS}
    if tok.bos_id is not None:
        names[tok.bos_id] = BOS
    names.update({i: ROLE_MARKERS[role] for role, i in tok.role_ids.items()})
    return names


def _decode_with_specials(tok: Tokenizer, ids: Iterable[int], skip_special: bool, plain) -> str:
    """Decode runs of ordinary ids with ``plain`` and drop or render the special ids."""
    names = _special_names(tok)
    pieces, run = [], []
    for i in (int(i) for i in ids):
        if i in names:
            pieces.append(plain(run))
            run = []
            if not skip_special:
                pieces.append(names[i])
        else:
            run.append(i)
    pieces.append(plain(run))
    return "".join(pieces)


def _byte_to_char_index(text: str) -> np.ndarray:
    """``index[b]`` = index of the character holding UTF-8 byte ``b`` (length nbytes + 1)."""
    lengths = [len(ch.encode("utf-8")) for ch in text]
    index = np.repeat(np.arange(len(text), dtype=np.int32), lengths)
    return np.append(index, np.int32(len(text)))


class ByteTokenizer:
    """UTF-8 bytes plus six special ids; needs no files (the default tokenizer).

    Ids: ``0`` pad, ``1`` bos, ``2`` eos, ``3`` <|system|>, ``4`` <|human|>,
    ``5`` <|assistant|>, then byte ``b`` has id ``b + 6``; ``vocab_size = 262``.
    """

    NUM_SPECIAL = 6

    @property
    def vocab_size(self) -> int:
        """256 bytes plus the special ids."""
        return 256 + self.NUM_SPECIAL

    @property
    def pad_id(self) -> int:
        """Padding id (0)."""
        return 0

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id (1)."""
        return 1

    @property
    def eos_id(self) -> int:
        """End-of-sequence id (2)."""
        return 2

    @property
    def role_ids(self) -> Mapping[str, int]:
        """Role markers: system 3, human 4, assistant 5."""
        return {"system": 3, "human": 4, "assistant": 5}

    def encode(self, text: str) -> np.ndarray:
        """UTF-8 bytes of ``text`` shifted past the special ids."""
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return data.astype(np.int32) + self.NUM_SPECIAL

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Ids and, per byte, the character span ``(c, c + 1)`` of the character holding it."""
        ids = self.encode(text)
        starts = _byte_to_char_index(text)[:-1]
        return ids, np.stack([starts, starts + 1], axis=-1).reshape(-1, 2).astype(np.int32)

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Bytes back to text, replacing invalid UTF-8 with U+FFFD."""
        return _decode_with_specials(self, ids, skip_special, self._decode_plain)

    def _decode_plain(self, ids: Sequence[int]) -> str:
        data = bytes(i - self.NUM_SPECIAL for i in ids if i >= self.NUM_SPECIAL)
        return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece model trained locally, with byte fallback and exact round trips.

    Training uses identity normalisation, no dummy prefix and no whitespace folding, so
    ``decode(encode(t)) == t`` for any text, and byte fallback, so unseen characters
    (emoji, scripts absent from the corpus) still encode. Ids ``0..3`` are pad, unk, bos,
    eos and the role markers follow as SentencePiece *control* symbols (ids ``4..6``).
    Control symbols, unlike user-defined symbols, are never produced from input text,
    which is what keeps ``"<|human|>"`` in data from turning into a role marker.

    Reference: Kudo & Richardson (2018), "SentencePiece: A simple and language independent
    subword tokenizer and detokenizer for Neural Text Processing".
    """

    MODEL_FILE = "tokenizer.model"

    def __init__(self, model_path: str | pathlib.Path):
        """Load ``model_path`` (a ``.model`` file or a directory holding ``tokenizer.model``)."""
        path = pathlib.Path(model_path)
        if path.is_dir():
            path = path / self.MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no SentencePiece model at {path}")
        self.model_path = path
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        self._role_ids = {}
        for role, marker in ROLE_MARKERS.items():
            idx = self._sp.piece_to_id(marker)
            if idx == self._sp.unk_id():
                raise ValueError(f"{path} has no control symbol {marker!r}; train it with train()")
            self._role_ids[role] = idx

    @classmethod
    def train(
        cls,
        sentences: Iterable[str],
        directory: str | pathlib.Path,
        *,
        vocab_size: int = 1000,
        model_type: str = "bpe",
    ) -> SentencePieceTokenizer:
        """Train on ``sentences``, write ``directory/tokenizer.model`` and load it.

        Args:
          sentences: training text, one sentence per item.
          directory: where the model is written (created if absent).
          vocab_size: target size; at least 256 byte pieces + 7 specials + the corpus'
            characters are always kept (``hard_vocab_limit=False``).
          model_type: ``"bpe"`` or ``"unigram"``.
        """
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / cls.MODEL_FILE, "wb") as model_writer:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=model_writer,
                vocab_size=vocab_size,
                model_type=model_type,
                byte_fallback=True,
                pad_id=0,
                unk_id=1,
                bos_id=2,
                eos_id=3,
                control_symbols=[ROLE_MARKERS[r] for r in ROLES],
                normalization_rule_name="identity",
                add_dummy_prefix=False,
                remove_extra_whitespaces=False,
                hard_vocab_limit=False,
                minloglevel=2,
            )
        return cls(directory)

    @property
    def vocab_size(self) -> int:
        """Number of pieces."""
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        """Padding id (0)."""
        return self._sp.pad_id()

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id."""
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        """End-of-sequence id."""
        return self._sp.eos_id()

    @property
    def role_ids(self) -> Mapping[str, int]:
        """Role marker ids (control symbols)."""
        return dict(self._role_ids)

    def encode(self, text: str) -> np.ndarray:
        """Plain text -> ids."""
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Ids with character offsets (SentencePiece reports bytes; converted here)."""
        pieces = self._sp.encode(text, out_type="proto").pieces
        char_of_byte = _byte_to_char_index(text)
        ids = np.asarray([p.id for p in pieces], dtype=np.int32)
        offsets = np.zeros((len(pieces), 2), dtype=np.int32)
        for k, piece in enumerate(pieces):
            start = char_of_byte[piece.begin]
            # A byte-fallback piece inside a multi-byte character has begin == end: it
            # belongs to the character holding byte ``begin``.
            end = char_of_byte[piece.end - 1] + 1 if piece.end > piece.begin else start + 1
            offsets[k] = (start, end)
        return ids, offsets

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Ids -> text (byte-fallback pieces that form invalid UTF-8 become U+FFFD)."""
        return _decode_with_specials(self, ids, skip_special, self._decode_plain)

    def _decode_plain(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids)) if ids else ""


def _token_content(value) -> str | None:
    """A special token entry of tokenizer_config.json: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_special_tokens(directory: pathlib.Path) -> dict[str, str]:
    """``{"bos_token": ..., "eos_token": ..., "pad_token": ...}`` from the config files."""
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / name
        if not path.is_file():
            continue
        config = json.loads(path.read_text(encoding="utf-8"))
        for key in ("bos_token", "eos_token", "pad_token"):
            content = _token_content(config.get(key))
            if content is not None:
                found[key] = content
    return found


class HuggingFaceTokenizer:
    """A local ``tokenizer.json`` read with the ``tokenizers`` library (never a hub).

    Imported checkpoints keep their own vocabulary. ``bos``/``eos``/``pad`` are the
    ``bos_token``/``eos_token``/``pad_token`` arguments when given, else the entries of
    ``tokenizer_config.json`` (which wins over ``special_tokens_map.json``) when present.
    Without a pad token the eos id is used for padding (padding positions are masked, so
    the id only has to be valid).
    Role markers must already be tokens of the vocabulary; with
    ``add_missing_role_tokens=True`` missing ones are appended as special tokens instead,
    which grows ``vocab_size`` (the model's embedding must then be resized).
    """

    FILE = "tokenizer.json"

    def __init__(
        self,
        directory: str | pathlib.Path,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        role_tokens: Mapping[str, str] = ROLE_MARKERS,
        add_missing_role_tokens: bool = False,
    ):
        """Load ``directory/tokenizer.json`` and resolve the special ids."""
        directory = pathlib.Path(directory)
        path = directory / self.FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {self.FILE} in {directory}")
        self._tok = hf_tokenizers.Tokenizer.from_file(str(path))
        self._tok.encode_special_tokens = True  # marker strings in text stay plain text
        configured = _read_special_tokens(directory)
        bos = bos_token if bos_token is not None else configured.get("bos_token")
        eos = eos_token if eos_token is not None else configured.get("eos_token")
        pad = pad_token if pad_token is not None else configured.get("pad_token")
        if eos is None:
            raise ValueError(f"{directory}: no eos token in the config files; pass eos_token=")
        missing = [t for t in role_tokens.values() if self._tok.token_to_id(t) is None]
        if missing and not add_missing_role_tokens:
            raise ValueError(
                f"{path} has no role tokens {missing}; pass role_tokens= naming existing "
                "tokens, or add_missing_role_tokens=True to append them"
            )
        if missing:
            self._tok.add_special_tokens(missing)
        self._eos_id = self._require_id(eos, path)
        self._bos_id = None if bos is None else self._require_id(bos, path)
        self._pad_id = self._eos_id if pad is None else self._require_id(pad, path)
        self._role_ids = {role: self._require_id(t, path) for role, t in role_tokens.items()}

    def _require_id(self, token: str, path: pathlib.Path) -> int:
        idx = self._tok.token_to_id(token)
        if idx is None:
            raise ValueError(f"{path}: token {token!r} is not in the vocabulary")
        return idx

    @property
    def vocab_size(self) -> int:
        """Vocabulary size including added tokens."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        """Padding id (the eos id when the tokenizer defines no pad token)."""
        return self._pad_id

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or ``None``."""
        return self._bos_id

    @property
    def eos_id(self) -> int:
        """End-of-sequence id."""
        return self._eos_id

    @property
    def role_ids(self) -> Mapping[str, int]:
        """Role marker ids."""
        return dict(self._role_ids)

    def encode(self, text: str) -> np.ndarray:
        """Plain text -> ids, without the tokenizer's own post-processing (no bos/eos)."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Ids and the library's character offsets."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        ids = np.asarray(encoding.ids, dtype=np.int32)
        offsets = np.asarray(encoding.offsets, dtype=np.int32).reshape(-1, 2)
        return ids, offsets

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Ids -> text (the library's decoder replaces invalid UTF-8)."""
        return _decode_with_specials(self, ids, skip_special, self._decode_plain)

    def _decode_plain(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False) if ids else ""
