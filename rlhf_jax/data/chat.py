r"""One chat template for every tokenizer, and the Anthropic dialogue text format.

A dialogue is a list of ``(role, text)`` turns with roles ``"system"``, ``"human"`` and
``"assistant"``. It is rendered as::

    [bos] <role_1> text_1 [eos if role_1 is assistant] <role_2> text_2 ...

where ``<role>`` is the tokenizer's special id for that role, ``text`` is the tokenizer's
plain-text encoding and ``bos`` is present when the tokenizer has one. Only the
assistant's text tokens and the eos that closes each assistant turn are *response*
tokens (``assistant_mask``): they are what supervised fine-tuning learns to produce,
stopping included; role markers belong to the context, so the generation prompt for a
reply is the dialogue so far followed by ``<assistant>``. This makes

    render_chat(turns + [("assistant", r)]).ids
        == concat(render_prompt(turns), render_response(r))

so the tokens a sampler conditions on are exactly those the losses see.

URIAL (Lin et al., 2023, "The Unlocking Spell on Base LLMs: Rethinking Alignment via
In-Context Learning") aligns an untuned base model without training: a system prompt and
``K`` stylistic examples ``(query_k, answer_k)`` are prepended as prior turns,

    render_urial_prompt(turns, tok, alignment)
        == render_prompt([("system", s), ("human", q_1), ("assistant", a_1), ...,
                          ("human", q_K), ("assistant", a_K), *turns], tok)

and with no system prompt and no examples it is :func:`render_prompt` itself. The paper
writes its prompt as plain text with ``# Query:`` / ``# Answer:`` headers; here the chat
template's role markers play those headers' part.

The Anthropic HH-RLHF text format (Bai et al., 2022, "Training a Helpful and Harmless
Assistant with Reinforcement Learning from Human Feedback") writes a dialogue as
``"\n\nHuman: ...\n\nAssistant: ..."``; :func:`parse_anthropic` and
:func:`format_anthropic` convert between it and turns.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from rlhf_jax.data.tokenizers import ROLES, Tokenizer

Turn = tuple[str, str]

_ANTHROPIC_NAMES = {"Human": "human", "Assistant": "assistant"}
_ANTHROPIC_MARKER = re.compile(r"\n\n(Human|Assistant):[ ]?")


@dataclasses.dataclass(frozen=True)
class RenderedChat:
    """A rendered dialogue.

    Attributes:
      ids: int32 ``[T]`` token ids.
      assistant_mask: bool ``[T]``, true on assistant text tokens and the eos after each
        assistant turn (the SFT loss mask).
      prompt_length: number of leading tokens before the final assistant turn's response
        (they end with the ``<assistant>`` marker); ``None`` when the last turn is not an
        assistant turn.
    """

    ids: np.ndarray
    assistant_mask: np.ndarray
    prompt_length: int | None

    @property
    def prompt_ids(self) -> np.ndarray:
        """Tokens up to and including the final ``<assistant>`` marker."""
        if self.prompt_length is None:
            raise ValueError("the dialogue does not end with an assistant turn")
        return self.ids[: self.prompt_length]

    @property
    def response_ids(self) -> np.ndarray:
        """The final assistant turn's text tokens and its eos."""
        if self.prompt_length is None:
            raise ValueError("the dialogue does not end with an assistant turn")
        return self.ids[self.prompt_length :]


def validate_turns(turns: Sequence[Turn]) -> None:
    """Raise ``ValueError`` naming the turn if a role is unknown or a text is not a string."""
    for k, turn in enumerate(turns):
        if len(turn) != 2:
            raise ValueError(f"turn {k} must be (role, text), got {turn!r}")
        role, text = turn
        if role not in ROLES:
            raise ValueError(f"turn {k} has role {role!r}; expected one of {ROLES}")
        if not isinstance(text, str):
            raise ValueError(f"turn {k} text must be str, got {type(text).__name__}")


def render_response(text: str, tokenizer: Tokenizer) -> np.ndarray:
    """An assistant reply's tokens: ``encode(text)`` followed by eos."""
    return np.append(tokenizer.encode(text), np.int32(tokenizer.eos_id)).astype(np.int32)


def _bos(tokenizer: Tokenizer, add_bos: bool) -> list[np.ndarray]:
    if add_bos and tokenizer.bos_id is not None:
        return [np.asarray([tokenizer.bos_id], dtype=np.int32)]
    return []


def render_chat(
    turns: Sequence[Turn], tokenizer: Tokenizer, *, add_bos: bool = True
) -> RenderedChat:
    """Render ``turns`` with the template in the module docstring.

    Args:
      turns: ``(role, text)`` pairs, roles in ``("system", "human", "assistant")``.
      tokenizer: any :class:`~rlhf_jax.data.tokenizers.Tokenizer`.
      add_bos: prepend the tokenizer's bos id (when it has one).

    Returns:
      A :class:`RenderedChat` with ids, the assistant (loss) mask and the prompt length
      of the final assistant turn.
    """
    validate_turns(turns)
    pieces = _bos(tokenizer, add_bos)
    masks = [np.zeros(len(p), dtype=bool) for p in pieces]
    prompt_length = None
    for role, text in turns:
        marker = np.asarray([tokenizer.role_ids[role]], dtype=np.int32)
        pieces.append(marker)
        masks.append(np.zeros(1, dtype=bool))
        if role == "assistant":
            prompt_length = sum(len(p) for p in pieces)
            body = render_response(text, tokenizer)
            masks.append(np.ones(len(body), dtype=bool))
        else:
            prompt_length = None
            body = tokenizer.encode(text)
            masks.append(np.zeros(len(body), dtype=bool))
        pieces.append(body)
    ids = np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)
    mask = np.concatenate(masks) if masks else np.zeros(0, bool)
    return RenderedChat(ids=ids, assistant_mask=mask, prompt_length=prompt_length)


def render_prompt(
    turns: Sequence[Turn], tokenizer: Tokenizer, *, add_bos: bool = True
) -> np.ndarray:
    """The generation prompt for the next assistant reply: ``render_chat(turns)`` + ``<assistant>``.

    Raises:
      ValueError: if the last turn is already an assistant turn.
    """
    if turns and turns[-1][0] == "assistant":
        raise ValueError("the prompt's last turn is an assistant turn; nothing to reply to")
    context = render_chat(turns, tokenizer, add_bos=add_bos).ids
    marker = np.int32(tokenizer.role_ids["assistant"])
    return np.append(context, marker).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class InContextAlignment:
    """URIAL's in-context alignment: a system prompt and stylistic examples (Lin et al., 2023).

    Attributes:
      system_prompt: text of a leading ``system`` turn; ``""`` for none.
      examples: ``(query, answer)`` pairs rendered as prior human and assistant turns.
    """

    system_prompt: str = ""
    examples: tuple[tuple[str, str], ...] = ()


def in_context_turns(turns: Sequence[Turn], alignment: InContextAlignment) -> list[Turn]:
    """``[system prompt] + [(human, q_k), (assistant, a_k)]_k + turns``.

    Raises:
      ValueError: if both ``alignment`` and ``turns`` bring a system prompt.
    """
    prefix: list[Turn] = []
    if alignment.system_prompt:
        if any(role == "system" for role, _ in turns):
            raise ValueError("the turns already hold a system turn; drop it or the system_prompt")
        prefix.append(("system", alignment.system_prompt))
    for query, answer in alignment.examples:
        prefix.extend([("human", query), ("assistant", answer)])
    return prefix + list(turns)


def render_urial_prompt(
    turns: Sequence[Turn],
    tokenizer: Tokenizer,
    alignment: InContextAlignment,
    *,
    add_bos: bool = True,
) -> np.ndarray:
    """The generation prompt with URIAL's prefix: ``render_prompt(in_context_turns(...))``."""
    return render_prompt(in_context_turns(turns, alignment), tokenizer, add_bos=add_bos)


def split_final_assistant(turns: Sequence[Turn]) -> tuple[list[Turn], str]:
    """``(context turns, final assistant text)``; raises if the last turn is not assistant."""
    if not turns or turns[-1][0] != "assistant":
        raise ValueError("the dialogue does not end with an assistant turn")
    return list(turns[:-1]), turns[-1][1]


def parse_anthropic(text: str) -> list[Turn]:
    r"""Parse ``"\n\nHuman: a\n\nAssistant: b"`` into ``[("human", "a"), ("assistant", "b")]``.

    The single space after each ``Role:`` belongs to the marker; everything else is kept
    verbatim (empty turns included: rejecting them is the caller's policy).

    Raises:
      ValueError: if the text does not start with a ``"\n\nHuman:"`` or
        ``"\n\nAssistant:"`` marker.
    """
    parts = _ANTHROPIC_MARKER.split(text)
    if parts[0] != "" or len(parts) < 3:
        head = text[:40]
        raise ValueError(f"dialogue must start with '\\n\\nHuman: ', got {head!r}")
    names, texts = parts[1::2], parts[2::2]
    return [(_ANTHROPIC_NAMES[n], t) for n, t in zip(names, texts, strict=True)]


def format_anthropic(turns: Sequence[Turn]) -> str:
    """Inverse of :func:`parse_anthropic` for human and assistant turns."""
    validate_turns(turns)
    names = {v: k for k, v in _ANTHROPIC_NAMES.items()}
    if any(role not in names for role, _ in turns):
        raise ValueError("the Anthropic format has only human and assistant turns")
    return "".join(f"\n\n{names[role]}: {text}" for role, text in turns)
