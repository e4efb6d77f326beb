"""QA-Feedback (Fine-Grained RLHF): four-way preferences and span-level error labels.

Source: Wu et al. (2023), "Fine-Grained Human Feedback Gives Better Rewards for Language
Model Training", built on ASQA (Stelmakh et al., 2022). A file (``train_feedback.json`` or
``dev_feedback.json``, optionally ``.gz``) is one JSON array of records with ``question``,
``passages`` (``[title, sentence, ...]`` lists), ``gold``, ``"prediction 1"`` ..
``"prediction 4"``, ``feedback`` (``errors``: character spans of ``"prediction 1"`` with an
``"error type"``) and ``preference``: six judgements for the pairs 1v2, 1v3, 1v4, 2v3,
2v4, 3v4, each 1 (first preferred), 2 (second preferred) or 0 (tie).

Ranking (config ``ranked``). The six judgements need not be transitive, so the four
predictions are ranked by their Copeland score: ``score_i = wins_i + ties_i / 2`` over the
three comparisons involving ``i``, and ``rank_i = 1 + #{j : score_j > score_i}`` (rank 1 is
best). Equal scores share a rank (ties stay ties), and an intransitive cycle such as
1 > 2 > 3 > 1 gives its members equal scores and thus equal ranks instead of an arbitrary
order. A record whose six judgements are all ties is kept, with four equal ranks, so the
spans of every record stay in the ``ranked`` config.

Pairs (config ``pairs``). Each non-tied judgement is one (chosen, rejected) pair; each tied
judgement is a ``tie`` (skipped and counted by default).

Error spans. Both configs keep the record's passages; ``ranked`` also keeps the spans of
``"prediction 1"`` (``error_types``, ``error_starts``, ``error_ends``: ``[start, end)``
character offsets). :func:`error_token_labels` turns them into per-token labels for any
tokenizer, the dense targets of the fine-grained reward models.

The real development file (500 questions, Apache-2.0, its provenance in ``NOTICE``) ships
with the package: ``source_dir=bundled_dev_dir()`` builds it anywhere the package is
installed, with nothing to download.
"""

from __future__ import annotations

import itertools
import pathlib
from collections.abc import Sequence
from typing import Any

import chex
import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data.builders.local_builder import (
    Example,
    LocalBuilder,
    Note,
    RecordError,
    check_text,
    field,
    text_field,
)
from rlhf_jax.data.errors import Reason
from rlhf_jax.data.tokenizers import Tokenizer

#: Error types annotated on spans: C1 (irrelevance, repetition, incoherence) then C2
#: (incorrect or unverifiable facts), in the paper's categories.
ERROR_TYPES = ("Irrelevant", "Redundant", "Incoherent", "Wrong-Grounding", "Unverifiable")
NUM_PREDICTIONS = 4
#: The prediction pairs judged by ``preference``, in order (0-based indices).
JUDGED_PAIRS = tuple(itertools.combinations(range(NUM_PREDICTIONS), 2))


def bundled_dev_dir() -> pathlib.Path:
    """The folder of the packaged ``dev_feedback.json.gz`` (the real dev split) and NOTICE."""
    return pathlib.Path(__file__).resolve().parent / "data" / "qa_feedback"


def copeland_ranks(preference: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Scores and ranks of the four predictions from the six pairwise judgements.

    Args:
      preference: six values in {0, 1, 2} for the pairs in :data:`JUDGED_PAIRS`.

    Returns:
      ``(scores, ranks)``: float32 ``[4]`` with ``score_i = wins_i + ties_i / 2``, and
      int32 ``[4]`` with ``rank_i = 1 + #{j : score_j > score_i}``.
    """
    if len(preference) != len(JUDGED_PAIRS) or any(p not in (0, 1, 2) for p in preference):
        raise ValueError(f"preference must be six values in {{0, 1, 2}}, got {preference!r}")
    scores = np.zeros(NUM_PREDICTIONS, dtype=np.float32)
    for (i, j), judgement in zip(JUDGED_PAIRS, preference, strict=True):
        if judgement == 0:
            scores[[i, j]] += 0.5
        else:
            scores[i if judgement == 1 else j] += 1.0
    ranks = 1 + (scores[None, :] > scores[:, None]).sum(axis=1)
    return scores, ranks.astype(np.int32)


def span_token_labels(
    offsets: np.ndarray, spans: Sequence[tuple[int, int, int]], num_labels: int
) -> np.ndarray:
    """Multi-hot labels: token ``t`` gets label ``k`` iff it overlaps a span of label ``k``.

    A token with character range ``[s, e)`` overlaps span ``[a, b)`` iff ``s < b`` and
    ``e > a``; a token with an empty range overlaps nothing.

    Args:
      offsets: int ``[T, 2]`` character offsets per token.
      spans: ``(start, end, label)`` with ``0 <= label < num_labels``.
      num_labels: number of label columns.

    Returns:
      bool ``[T, num_labels]``.
    """
    offsets = np.asarray(offsets)
    chex.assert_shape(offsets, (None, 2))
    labels = np.zeros((len(offsets), num_labels), dtype=bool)
    starts, ends = offsets[:, 0], offsets[:, 1]
    for start, end, label in spans:
        labels[:, label] |= (starts < end) & (ends > start) & (ends > starts)
    return labels


def error_token_labels(
    text: str,
    spans: Sequence[tuple[int, int, str]],
    tokenizer: Tokenizer,
    error_types: Sequence[str] = ERROR_TYPES,
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise ``text`` and label each token with the error types of the spans it overlaps.

    Args:
      text: the annotated answer (``"prediction 1"``).
      spans: ``(start, end, error type)`` character spans, e.g.
        ``zip(ex["error_starts"], ex["error_ends"], ex["error_types"])``.
      tokenizer: any tokenizer with ``encode_with_offsets``.
      error_types: label columns, in order.

    Returns:
      ``(ids int32 [T], labels bool [T, len(error_types)])``.
    """
    column = {name: k for k, name in enumerate(error_types)}
    unknown = {name for _, _, name in spans} - set(column)
    if unknown:
        raise ValueError(f"unknown error types {sorted(unknown)}; known: {list(error_types)}")
    ids, offsets = tokenizer.encode_with_offsets(text)
    labelled = [(start, end, column[name]) for start, end, name in spans]
    return ids, span_token_labels(offsets, labelled, len(error_types))


def _passages(record: Any) -> tuple[list[str], list[str]]:
    titles, texts = [], []
    for k, passage in enumerate(field(record, "passages", list)):
        if (
            not isinstance(passage, list)
            or not passage
            or not all(isinstance(s, str) for s in passage)
        ):
            raise RecordError(Reason.BAD_VALUE, f"passage {k} is not a [title, sentence, ...] list")
        titles.append(passage[0])
        texts.append(" ".join(passage[1:]))
    return titles, texts


def _error_spans(record: Any, answer: str) -> list[tuple[int, int, str]]:
    spans = []
    for k, error in enumerate(field(field(record, "feedback", dict), "errors", list)):
        kind = field(error, "error type", str)
        start, end = field(error, "start", int), field(error, "end", int)
        if kind not in ERROR_TYPES:
            raise RecordError(Reason.BAD_VALUE, f"error {k} has unknown type {kind!r}")
        if not 0 <= start < end <= len(answer):
            detail = (
                f"error {k} span [{start}, {end}) is outside 'prediction 1' ({len(answer)} chars)"
            )
            raise RecordError(Reason.BAD_VALUE, detail)
        spans.append((start, end, kind))
    return spans


class QaFeedback(LocalBuilder):
    """QA-Feedback as ranked lists (config ``ranked``) or pairs (config ``pairs``).

    ``ranked`` features: ``question``, ``gold``, ``passage_titles``, ``passage_texts``,
    ``predictions`` (4), ``scores`` (Copeland, float32), ``ranks`` (int32, 1 = best),
    ``error_types``, ``error_starts``, ``error_ends`` (spans of prediction 1),
    ``corrected_prediction``.
    ``pairs`` features: ``question``, ``passage_titles``, ``passage_texts``, ``chosen``,
    ``rejected``, ``chosen_index``, ``rejected_index`` (0-based prediction indices).
    """

    BUILDER_CONFIGS = [  # noqa: RUF012
        tfds.core.BuilderConfig(name="ranked", description="four predictions, ranked"),
        tfds.core.BuilderConfig(name="pairs", description="non-tied pairwise judgements"),
    ]
    SPLIT_STEMS = {"train": ("train_feedback",), "dev": ("dev_feedback",)}  # noqa: RUF012

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        texts = tfds.features.Sequence(text)
        index = tfds.features.Scalar(dtype=np.int32)
        features = {"question": text, "passage_titles": texts, "passage_texts": texts}
        if self.builder_config.name == "ranked":
            features |= {"gold": text, "predictions": texts, "corrected_prediction": text}
            features |= {
                "scores": tfds.features.Sequence(tfds.features.Scalar(dtype=np.float32)),
                "ranks": tfds.features.Sequence(index),
                "error_types": texts,
                "error_starts": tfds.features.Sequence(index),
                "error_ends": tfds.features.Sequence(index),
            }
        else:
            features |= {"chosen": text, "rejected": text}
            features |= {"chosen_index": index, "rejected_index": index}
        return self._info_with(features, homepage="https://github.com/allenai/FineGrainedRLHF")

    def _convert(self, record: Any, note: Note) -> list[tuple[str, Example]]:
        limit = self.max_text_chars
        question = text_field(record, "question", limit)
        titles, passage_texts = _passages(record)
        predictions = [text_field(record, f"prediction {k}", limit) for k in range(1, 5)]
        preference = field(record, "preference", list)
        try:
            scores, ranks = copeland_ranks(preference)
        except ValueError as error:
            raise RecordError(Reason.BAD_VALUE, f"'preference': {error}") from None
        shared = {"question": question, "passage_titles": titles, "passage_texts": passage_texts}
        if self.builder_config.name == "pairs":
            return self._pairs(shared, predictions, preference, note)
        spans = _error_spans(record, predictions[0])
        feedback = field(record, "feedback", dict)
        corrected = feedback.get("corrected-prediction") or ""
        example = shared | {
            "gold": check_text(field(record, "gold", str), "'gold'", limit),
            "predictions": predictions,
            "corrected_prediction": str(corrected),
            "scores": scores,
            "ranks": ranks,
            "error_types": [kind for _, _, kind in spans],
            "error_starts": [start for start, _, _ in spans],
            "error_ends": [end for _, end, _ in spans],
        }
        return [("0", example)]

    @staticmethod
    def _pairs(
        shared: Example, predictions: list[str], preference: list[int], note: Note
    ) -> list[tuple[str, Example]]:
        pairs = []
        for (i, j), judgement in zip(JUDGED_PAIRS, preference, strict=True):
            if judgement == 0:
                note(Reason.TIE, f"predictions {i + 1} and {j + 1} are tied")
                continue
            good, bad = (i, j) if judgement == 1 else (j, i)
            example = shared | {
                "chosen": predictions[good],
                "rejected": predictions[bad],
                "chosen_index": good,
                "rejected_index": bad,
            }
            pairs.append((f"{good}-{bad}", example))
        return pairs
