"""A policy-sized language model as a pairwise judge: a preference oracle for Nash-MD.

Generative reward models read a preference from a language model's verdict
(Zheng et al., 2023, "Judging LLM-as-a-Judge"; Chen et al., 2025, "RM-R1"): the judge sees
the prompt and two replies under a judging instruction, and

    P(a ≻ b) = σ(l_A − l_B),

the softmax of its next-token logits restricted to the verdict tokens "A" and "B"
(:mod:`rlhf_jax.objectives.judge`), symmetrised over both presentation orders by default.
:func:`make_lm_judge` wraps a decoder (``graphdef``, ``params``) and a tokenizer into
the oracle signature ``(prompt, a, b) -> P(a ≻ b)`` that the Nash-MD experiment's
host-side labelling takes (:func:`rlhf_jax.train.steps.nash_md.oracle_preferences`).
Every judging prompt is rendered with the chat template's generation prompt and
left-padded (or cut at the front) to ``max_length`` tokens, so the jitted forward
compiles once, whatever the lengths of the replies.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from jax import Array

from rlhf_jax.data.batching import pad_prompts_left
from rlhf_jax.data.chat import Turn, render_prompt
from rlhf_jax.data.tokenizers import Tokenizer
from rlhf_jax.objectives.judge import DEFAULT_INSTRUCTION, last_token_logits, make_judge_preference
from rlhf_jax.train.state import PyTree

Oracle = Callable[[str, str, str], float]


def verdict_token_ids(
    tokenizer: Tokenizer, verdicts: tuple[str, str] = ("A", "B")
) -> tuple[int, int]:
    """The ids of the two verdict tokens; each verdict must encode to exactly one token."""
    ids = [tokenizer.encode(text) for text in verdicts]
    for text, encoded in zip(verdicts, ids, strict=True):
        if len(encoded) != 1:
            raise ValueError(f"verdict {text!r} encodes to {len(encoded)} tokens; expected one")
    return int(ids[0][0]), int(ids[1][0])


def make_next_token_logits(
    graphdef: nnx.GraphDef, params: PyTree, *, pad_id: int, max_length: int
) -> Callable[[np.ndarray], Array]:
    """``ids [T] -> logits [V]`` of the token after ``ids``, one compiled forward.

    The ids are left-padded to ``max_length`` (a longer prompt keeps its last
    ``max_length`` tokens); positions follow the attention mask inside the decoder, so
    padding does not change the logits.
    """

    @jax.jit
    def forward(params: PyTree, ids: Array, mask: Array) -> Array:
        logits, _ = nnx.merge(graphdef, params)(ids, attention_mask=mask)
        return last_token_logits(logits, mask)[0]

    def next_token_logits(ids: np.ndarray) -> Array:
        arrays, _ = pad_prompts_left([ids], pad_id=pad_id, max_length=max_length)
        return forward(params, arrays["input_ids"], arrays["attention_mask"])

    return next_token_logits


def make_lm_judge(
    graphdef: nnx.GraphDef,
    params: PyTree,
    tokenizer: Tokenizer,
    *,
    max_length: int,
    symmetrise: bool = True,
    instruction: str = DEFAULT_INSTRUCTION,
) -> Oracle:
    """A preference oracle ``(prompt, a, b) -> P(a ≻ b)`` read from a decoder's verdict.

    Args:
      graphdef: the judge decoder's graph definition (e.g. an SFT policy's).
      params: its parameters.
      tokenizer: renders the judging dialogue (``objectives.judge.judge_turns``).
      max_length: the fixed width of every judging prompt.
      symmetrise: average over both presentation orders, so that
        ``P(a ≻ b) + P(b ≻ a) = 1``.
      instruction: the system instruction of the judging prompt.

    Returns:
      The oracle; it runs on the host (one or two jitted forwards per call).
    """

    def render(turns: list[Turn]) -> np.ndarray:
        return render_prompt(turns, tokenizer)

    return make_judge_preference(
        make_next_token_logits(graphdef, params, pad_id=tokenizer.pad_id, max_length=max_length),
        render,
        verdict_token_ids(tokenizer),
        symmetrise=symmetrise,
        instruction=instruction,
    )
