"""UltraFeedback-style rated completions, as score lists or as preference pairs.

Source: Cui et al. (2023), "UltraFeedback: Boosting Language Models with High-quality
Feedback". Each JSON line has an ``instruction`` and ``completions``, a list of
``{"response", "overall_score", "annotations": {aspect: {"Rating": "1".."5" | "N/A"}}, ...}``.
Every ``.json``/``.jsonl[.gz]`` file under the source directory is the ``train`` split (the
release ships one file per instruction source).

Scores (builder argument ``score``): ``"overall_score"`` (the critique's overall score) or
``"fine_grained"``, the mean of the numeric per-aspect ratings (``"N/A"`` ignored), which is
how the release defines its ``fine-grained_score``.

Configs:

- ``lists``: the instruction with every response and its score, for listwise objectives.
  A record whose scores are all equal carries no preference and is a ``tie``.
- ``pairs``: every ordered pair ``(i, j)`` with ``score_i > score_j``; each pair with
  equal scores is a ``tie`` (skipped and counted, by default).

Problems: fewer than two completions or a non-numeric score -> ``bad_value``; a missing
score -> ``missing_field``; an empty response -> ``empty_text`` (the whole record).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data.builders.local_builder import (
    Example,
    LocalBuilder,
    Note,
    RecordError,
    field,
    text_field,
)
from rlhf_jax.data.errors import Reason

ScoreSource = Literal["overall_score", "fine_grained"]


def _number(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RecordError(Reason.BAD_VALUE, f"{name} is {value!r}, not a number") from None
    if not math.isfinite(number):
        raise RecordError(Reason.BAD_VALUE, f"{name} is {value!r}, not finite")
    return number


def fine_grained_score(annotations: dict[str, Any]) -> float:
    """Mean of the numeric ``Rating`` values over aspects (``"N/A"`` and absent ignored)."""
    ratings = []
    for aspect in sorted(annotations):
        rating = (
            annotations[aspect].get("Rating") if isinstance(annotations[aspect], dict) else None
        )
        if rating not in (None, "N/A"):
            ratings.append(_number(rating, f"annotations[{aspect!r}]['Rating']"))
    if not ratings:
        raise RecordError(Reason.MISSING_FIELD, "no numeric fine-grained rating")
    return sum(ratings) / len(ratings)


def _score(completion: dict[str, Any], source: ScoreSource, k: int) -> float:
    if source == "overall_score":
        return _number(
            field(completion, "overall_score", (int, float, str)), f"completion {k} overall_score"
        )
    return fine_grained_score(field(completion, "annotations", dict))


class UltraFeedback(LocalBuilder):
    """UltraFeedback as score lists (config ``lists``) or preference pairs (``pairs``).

    ``lists`` features: ``instruction``, ``responses``, ``scores`` (float32), ``models``.
    ``pairs`` features: ``instruction``, ``chosen``, ``rejected``, ``chosen_score``,
    ``rejected_score``.
    """

    BUILDER_CONFIGS = [  # noqa: RUF012
        tfds.core.BuilderConfig(name="lists", description="all responses with scores"),
        tfds.core.BuilderConfig(name="pairs", description="all strictly ordered pairs"),
    ]
    SPLIT_STEMS = {"train": None}  # noqa: RUF012

    def __init__(self, *, score: ScoreSource = "overall_score", **kwargs):
        """Create the builder; ``score`` picks the score source (see the module docstring)."""
        if score not in ("overall_score", "fine_grained"):
            raise ValueError(f"score must be 'overall_score' or 'fine_grained', got {score!r}")
        self.score_source = score
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        score = tfds.features.Scalar(dtype=np.float32)
        if self.builder_config.name == "lists":
            features = {
                "instruction": text,
                "responses": tfds.features.Sequence(text),
                "scores": tfds.features.Sequence(score),
                "models": tfds.features.Sequence(text),
            }
        else:
            features = {"instruction": text, "chosen": text, "rejected": text}
            features |= {"chosen_score": score, "rejected_score": score}
        return self._info_with(features, homepage="https://github.com/OpenBMB/UltraFeedback")

    def _convert(self, record: Any, note: Note) -> list[tuple[str, Example]]:
        limit = self.max_text_chars
        instruction = text_field(record, "instruction", limit)
        completions = field(record, "completions", list)
        if len(completions) < 2:
            raise RecordError(Reason.BAD_VALUE, f"{len(completions)} completions, need 2+")
        responses, scores, models = [], [], []
        for k, completion in enumerate(completions):
            responses.append(text_field(completion, "response", limit))
            scores.append(_score(completion, self.score_source, k))
            models.append(str(completion.get("model") or ""))
        if self.builder_config.name == "lists":
            if len(set(scores)) == 1:
                raise RecordError(Reason.TIE, f"all {len(scores)} scores equal {scores[0]}")
            example = {
                "instruction": instruction,
                "responses": responses,
                "scores": scores,
                "models": models,
            }
            return [("0", example)]
        pairs = []
        for i, j in itertools.combinations(range(len(responses)), 2):
            if scores[i] == scores[j]:
                note(Reason.TIE, f"completions {i} and {j} both score {scores[i]}")
                continue
            good, bad = (i, j) if scores[i] > scores[j] else (j, i)
            example = {
                "instruction": instruction,
                "chosen": responses[good],
                "rejected": responses[bad],
                "chosen_score": scores[good],
                "rejected_score": scores[bad],
            }
            pairs.append((f"{good}-{bad}", example))
        return pairs
