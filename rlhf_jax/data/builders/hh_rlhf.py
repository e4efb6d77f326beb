r"""Anthropic HH-RLHF preference pairs from local ``{split}.jsonl[.gz]`` files.

Source: Bai et al. (2022), "Training a Helpful and Harmless Assistant with Reinforcement
Learning from Human Feedback". Each line is ``{"chosen": dialogue, "rejected": dialogue}``
with dialogues in the ``"\n\nHuman: ...\n\nAssistant: ..."`` format. Both dialogues
share every turn but the last assistant reply; an example is that shared prompt plus the
two final replies. Files are found recursively, so the repository's layout
(``helpful-base/train.jsonl.gz``, ``harmless-base/train.jsonl.gz``, ...) builds as is.

Problems (see :mod:`rlhf_jax.data.errors`): unparsable dialogue or a dialogue not ending
with an assistant turn -> ``bad_value``; prompts that differ -> ``inconsistent``; empty
reply -> ``empty_text``; identical replies -> ``tie``.
"""

from __future__ import annotations

from typing import Any

import tensorflow_datasets as tfds

from rlhf_jax.data.builders.local_builder import (
    Example,
    LocalBuilder,
    Note,
    RecordError,
    check_text,
    field,
)
from rlhf_jax.data.chat import Turn, parse_anthropic, split_final_assistant
from rlhf_jax.data.errors import Reason


def _final_reply(dialogue: str, side: str) -> tuple[list[Turn], str]:
    try:
        return split_final_assistant(parse_anthropic(dialogue))
    except ValueError as error:
        raise RecordError(Reason.BAD_VALUE, f"{side!r}: {error}") from None


class AnthropicHhRlhf(LocalBuilder):
    """HH-RLHF as (prompt turns, chosen reply, rejected reply).

    Features: ``prompt_roles`` / ``prompt_texts`` (the shared turns, parallel lists),
    ``chosen``, ``rejected`` (final assistant replies).
    """

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return self._info_with(
            {
                "prompt_roles": tfds.features.Sequence(text),
                "prompt_texts": tfds.features.Sequence(text),
                "chosen": text,
                "rejected": text,
            },
            homepage="https://github.com/anthropics/hh-rlhf",
        )

    def _convert(self, record: Any, note: Note) -> list[tuple[str, Example]]:
        limit = self.max_text_chars
        chosen_context, chosen = _final_reply(field(record, "chosen", str), "chosen")
        rejected_context, rejected = _final_reply(field(record, "rejected", str), "rejected")
        if chosen_context != rejected_context:
            detail = "'chosen' and 'rejected' differ before their final assistant turn"
            raise RecordError(Reason.INCONSISTENT, detail)
        if not chosen_context:
            raise RecordError(Reason.BAD_VALUE, "the dialogue has no turn before the reply")
        for k, (_, text) in enumerate(chosen_context):
            check_text(text, f"prompt turn {k}", limit)
        check_text(chosen, "chosen reply", limit)
        check_text(rejected, "rejected reply", limit)
        if chosen == rejected:
            raise RecordError(Reason.TIE, "chosen and rejected replies are identical")
        example = {
            "prompt_roles": [role for role, _ in chosen_context],
            "prompt_texts": [text for _, text in chosen_context],
            "chosen": chosen,
            "rejected": rejected,
        }
        return [("0", example)]
