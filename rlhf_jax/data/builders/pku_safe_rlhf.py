"""PKU-SafeRLHF: one record gives a helpfulness pair and a harmlessness pair.

Source: Ji et al. (2023), "BeaverTails: Towards Improved Safety Alignment of LLM via a
Human-Preference Dataset", used by Dai et al. (2024), "Safe RLHF: Safe Reinforcement
Learning from Human Feedback". Each JSON line has ``prompt``, ``response_0``,
``response_1``, ``better_response_id``, ``safer_response_id``, ``is_response_0_safe``,
``is_response_1_safe``; local ``{train,test}.jsonl[.gz]`` files are found recursively.

Safe RLHF trains a reward model on the helpfulness pair and a cost model on the
harmlessness pair *and* the per-response safety signs (its cost-model loss: a cost above zero
should mean unsafe), so every example carries both pairs with each response's flag.

Problems: ids outside {0, 1} or non-boolean flags -> ``bad_value``; identical responses ->
``tie``; the safer response flagged unsafe while the other is flagged safe ->
``inconsistent``.
"""

from __future__ import annotations

from typing import Any

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


def _response_id(record: Any, key: str) -> int:
    value = field(record, key, int)
    if value not in (0, 1):
        raise RecordError(Reason.BAD_VALUE, f"{key!r} is {value}, expected 0 or 1")
    return value


class PkuSafeRlhf(LocalBuilder):
    """PKU-SafeRLHF with both preference pairs and the safety flags.

    Features: ``prompt``, ``response_0``, ``response_1``, ``better_response_id``,
    ``safer_response_id``, ``is_response_0_safe``, ``is_response_1_safe`` (as in the
    source), and the pairs ``better``/``worse`` (+ ``better_is_safe``/``worse_is_safe``)
    and ``safer``/``less_safe`` (+ ``safer_is_safe``/``less_safe_is_safe``).
    """

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        flag = tfds.features.Scalar(dtype=np.bool_)
        index = tfds.features.Scalar(dtype=np.int32)
        features = {k: text for k in ("prompt", "response_0", "response_1")}
        features |= {"better_response_id": index, "safer_response_id": index}
        features |= {"is_response_0_safe": flag, "is_response_1_safe": flag}
        for first, second in (("better", "worse"), ("safer", "less_safe")):
            features |= {first: text, second: text}
            features |= {f"{first}_is_safe": flag, f"{second}_is_safe": flag}
        return self._info_with(features, homepage="https://github.com/PKU-Alignment/safe-rlhf")

    def _convert(self, record: Any, note: Note) -> list[tuple[str, Example]]:
        limit = self.max_text_chars
        prompt = text_field(record, "prompt", limit)
        responses = [text_field(record, f"response_{k}", limit) for k in (0, 1)]
        safe = [field(record, f"is_response_{k}_safe", bool) for k in (0, 1)]
        better = _response_id(record, "better_response_id")
        safer = _response_id(record, "safer_response_id")
        if responses[0] == responses[1]:
            raise RecordError(Reason.TIE, "response_0 and response_1 are identical")
        if not safe[safer] and safe[1 - safer]:
            detail = f"response_{safer} is the safer one but flagged unsafe, the other safe"
            raise RecordError(Reason.INCONSISTENT, detail)
        example = {
            "prompt": prompt,
            "response_0": responses[0],
            "response_1": responses[1],
            "better_response_id": better,
            "safer_response_id": safer,
            "is_response_0_safe": safe[0],
            "is_response_1_safe": safe[1],
            "better": responses[better],
            "worse": responses[1 - better],
            "better_is_safe": safe[better],
            "worse_is_safe": safe[1 - better],
            "safer": responses[safer],
            "less_safe": responses[1 - safer],
            "safer_is_safe": safe[safer],
            "less_safe_is_safe": safe[1 - safer],
        }
        return [("0", example)]
