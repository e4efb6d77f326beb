"""A language model as a pairwise judge: P(a ≻ b) from its verdict-token probabilities.

Generative reward models (e.g. Chen et al., 2025, "RM-R1: Reward Modeling as
Reasoning"; Zheng et al., 2023, "Judging LLM-as-a-Judge") show a language model the
prompt and two responses under a judging instruction and read its verdict. Instead of
sampling a verdict, the preference can be read directly from the judge's next-token
distribution at the verdict position, restricted to the two verdict tokens:

    P(a ≻ b) = exp(l_A) / (exp(l_A) + exp(l_B)) = σ(l_A − l_B),

where ``l_A`` and ``l_B`` are the logits of the tokens "A" and "B" after the judging
prompt that shows a as response A and b as response B. Judges favour one position, so
the symmetrised preference averages with the order swapped,

    P_sym(a ≻ b) = ½ [P(a ≻ b | a first) + 1 − P(b ≻ a | b first)],

which satisfies ``P_sym(a ≻ b) + P_sym(b ≻ a) = 1`` by construction. Zheng et al. (2023)
swap the order to counter position bias but count a win only when both orders agree;
this averages the two probabilities instead. RM-R1 has the judge write a
rubric and reasoning before its verdict; reading the verdict token directly after the
prompt, as here, is the no-reasoning special case.

The array functions are pure and jittable. :func:`make_judge_preference` wires a
next-token-logits function and a chat renderer (e.g.
``functools.partial(rlhf_jax.data.chat.render_prompt, tokenizer=tok)``) into a callable
``(prompt, a, b) -> P(a ≻ b)``, the signature of a preference oracle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike

Turn = tuple[str, str]

DEFAULT_INSTRUCTION = (
    "You are an impartial judge. Read the user's question and two responses, then "
    "answer with a single letter: A if response A is better, B if response B is better."
)


def judge_turns(
    prompt: str, response_a: str, response_b: str, *, instruction: str = DEFAULT_INSTRUCTION
) -> list[Turn]:
    """The judging dialogue: a system instruction and one human turn showing both responses.

    Rendered with the chat template's generation prompt, the next token the judge
    produces is its verdict.
    """
    question = (
        f"Question:\n{prompt}\n\nResponse A:\n{response_a}\n\nResponse B:\n{response_b}\n\n"
        "Which response is better? Answer A or B."
    )
    return [("system", instruction), ("human", question)]


def last_token_logits(logits: Array, attention_mask: Array) -> Array:
    """Logits at each row's last real token: the next-token distribution after the prompt.

    Args:
      logits: ``[B, T, V]`` model logits.
      attention_mask: ``[B, T]`` mask of real tokens (left or right padding).

    Returns:
      ``[B, V]``.
    """
    chex.assert_rank(logits, 3)
    chex.assert_shape(attention_mask, logits.shape[:2])
    length = logits.shape[1]
    last = length - 1 - jnp.argmax(jnp.flip(attention_mask.astype(jnp.bool_), axis=1), axis=1)
    return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]


def verdict_probability(verdict_logits: Array, verdict_ids: tuple[int, int]) -> Array:
    """``P(first ≻ second) = σ(l_A − l_B)``, the softmax over the two verdict tokens.

    Args:
      verdict_logits: ``[B, V]`` logits at the verdict position.
      verdict_ids: ``(id of "A", id of "B")``.

    Returns:
      ``[B]`` probabilities that the response shown first is better.
    """
    chex.assert_rank(verdict_logits, 2)
    first_id, second_id = verdict_ids
    return jax.nn.sigmoid(verdict_logits[:, first_id] - verdict_logits[:, second_id])


def symmetrised_preference(
    logits_ab: Array, logits_ba: Array, verdict_ids: tuple[int, int]
) -> Array:
    """``½ [P(a ≻ b | a first) + 1 − P(b ≻ a | b first)]``, free of position bias.

    Args:
      logits_ab: ``[B, V]`` verdict logits with a shown as response A.
      logits_ba: ``[B, V]`` verdict logits with b shown as response A.
      verdict_ids: ``(id of "A", id of "B")``.

    Returns:
      ``[B]`` P(a ≻ b).
    """
    chex.assert_equal_shape([logits_ab, logits_ba])
    a_first = verdict_probability(logits_ab, verdict_ids)
    b_first = verdict_probability(logits_ba, verdict_ids)
    return 0.5 * (a_first + (1.0 - b_first))


def make_judge_preference(
    next_token_logits: Callable[[ArrayLike], Array],
    render: Callable[[Sequence[Turn]], ArrayLike],
    verdict_ids: tuple[int, int],
    *,
    symmetrise: bool = True,
    instruction: str = DEFAULT_INSTRUCTION,
) -> Callable[[str, str, str], float]:
    """A preference oracle ``(prompt, a, b) -> P(a ≻ b)`` backed by a judge model.

    Args:
      next_token_logits: ids ``[T]`` → logits ``[V]`` of the token after them (e.g. a
        jitted Decoder forward taking the last position).
      render: judging turns → prompt ids ending where the verdict is generated (e.g.
        ``functools.partial(chat.render_prompt, tokenizer=tok)``).
      verdict_ids: ``(id of "A", id of "B")`` in the judge's vocabulary.
      symmetrise: average over both presentation orders (two judge calls).
      instruction: the system instruction of the judging prompt.

    Returns:
      The callable; it runs on the host and returns a Python float.
    """

    def verdict_logits(first: str, second: str, prompt: str) -> Array:
        ids = render(judge_turns(prompt, first, second, instruction=instruction))
        return jnp.asarray(next_token_logits(ids))[None]

    def preference(prompt: str, response_a: str, response_b: str) -> float:
        logits_ab = verdict_logits(response_a, response_b, prompt)
        if not symmetrise:
            return float(verdict_probability(logits_ab, verdict_ids)[0])
        logits_ba = verdict_logits(response_b, response_a, prompt)
        return float(symmetrised_preference(logits_ab, logits_ba, verdict_ids)[0])

    return preference
