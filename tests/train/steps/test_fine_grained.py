"""Tests of the fine-grained RLHF pieces: byte-level sentences, dense rewards and their GAE."""

import jax.numpy as jnp
import numpy as np

from rlhf_jax.data.tokenizers import ByteTokenizer
from rlhf_jax.objectives.advantages import gae_advantages
from rlhf_jax.objectives.fine_grained import sentence_spans, token_segment_ids
from rlhf_jax.train.steps.fine_grained import (
    dense_rewards,
    segment_regression_loss,
    sentence_segment_ids,
)

TOKENIZER = ByteTokenizer()
END_IDS = tuple(int(i) for i in TOKENIZER.encode(".!?"))
SEPARATOR_IDS = tuple(int(i) for i in TOKENIZER.encode(" \n"))
TEXTS = (
    "Hello! Use 2.5 cups of flour. Bake it?! Done",
    "One sentence only.",
    "No end at all",
    "Two here. Trailing space. ",
)
PROMPT = 3  # prompt tokens before each response
WIDTH = PROMPT + max(len(t) for t in TEXTS) + 2


def rollout_rows():
    """Left prompt of 3 tokens, the response bytes, EOS, right padding."""
    tokens = np.zeros((len(TEXTS), WIDTH), np.int32)
    mask = np.zeros((len(TEXTS), WIDTH), np.float32)
    for row, text in enumerate(TEXTS):
        ids = [*TOKENIZER.encode(text), TOKENIZER.eos_id]
        tokens[row, :PROMPT] = 7
        tokens[row, PROMPT : PROMPT + len(ids)] = ids
        mask[row, PROMPT : PROMPT + len(ids)] = 1.0
    return tokens, mask


def expected_ids(text: str) -> np.ndarray:
    """The objective's character-span sentences mapped to byte tokens, then EOS."""
    _, offsets = TOKENIZER.encode_with_offsets(text)
    per_byte = np.asarray(token_segment_ids(offsets, sentence_spans(text)))
    return np.append(per_byte, per_byte[-1])  # EOS closes the last sentence


def test_sentences_on_bytes_follow_the_objectives_sentence_spans():
    tokens, mask = rollout_rows()
    ids = np.asarray(
        sentence_segment_ids(
            jnp.asarray(tokens),
            jnp.asarray(mask),
            end_ids=END_IDS,
            separator_ids=SEPARATOR_IDS,
            eos_id=TOKENIZER.eos_id,
        )
    )
    for row, text in enumerate(TEXTS):
        length = len(text) + 1
        np.testing.assert_array_equal(ids[row, PROMPT : PROMPT + length], expected_ids(text))
    # "2.5" does not close a sentence, "?!" closes one at its last byte.
    assert ids[0, PROMPT : PROMPT + len(TEXTS[0]) + 1].max() == 3


def test_dense_rewards_at_sentence_ends_give_the_reference_gae():
    tokens, mask = rollout_rows()
    rng = np.random.default_rng(0)
    helpful, harm = rng.normal(size=(2, *tokens.shape)).astype(np.float32)
    values = (rng.normal(size=tokens.shape) * mask).astype(np.float32)
    weights = (1.0, -0.5)
    ids = sentence_segment_ids(
        jnp.asarray(tokens),
        jnp.asarray(mask),
        end_ids=END_IDS,
        separator_ids=SEPARATOR_IDS,
        eos_id=TOKENIZER.eos_id,
    )
    rewards = dense_rewards(
        [jnp.asarray(helpful), jnp.asarray(harm)], ids, jnp.asarray(mask), weights
    )
    advantages, _ = gae_advantages(
        rewards, jnp.asarray(values), jnp.asarray(mask), gamma=0.9, lam=0.8
    )
    # Reference, from the text: a sentence's reward sits on its last byte (or on EOS for
    # the last sentence), r = Σ_k w_k (model k's scalar there); GAE by the numpy loop.
    expected_rewards = np.zeros_like(helpful)
    for row, text in enumerate(TEXTS):
        ends = [PROMPT + end - 1 for _, end in sentence_spans(text)[:-1]]
        ends.append(PROMPT + len(text))  # the EOS token closes the last sentence
        for t in ends:
            expected_rewards[row, t] = weights[0] * helpful[row, t] + weights[1] * harm[row, t]
    np.testing.assert_allclose(rewards, expected_rewards, rtol=1e-6, atol=1e-7)
    expected = np.zeros_like(values)
    for row in range(len(TEXTS)):
        positions = np.flatnonzero(mask[row])
        running, next_value = 0.0, 0.0
        for t in positions[::-1]:
            delta = expected_rewards[row, t] + 0.9 * next_value - values[row, t]
            running = delta + 0.9 * 0.8 * running
            expected[row, t], next_value = running, values[row, t]
    # float32 scan vs float64 loop over ≤ 46 steps.
    np.testing.assert_allclose(advantages, expected, rtol=1e-5, atol=1e-5)


def test_segment_regression_loss_averages_over_sentence_ends():
    scalars = jnp.array([[1.0, 2.0, 3.0], [0.0, -1.0, 5.0]])
    ends = jnp.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    labels = jnp.array([[0.0, 1.0, 1.0], [2.0, 0.0, 0.0]])
    loss, metrics = segment_regression_loss(scalars, ends, labels)
    # Errors at the three ends: 1, 2, −2 → ½ (1 + 4 + 4) / 3.
    np.testing.assert_allclose(loss, 1.5, rtol=1e-6)
    np.testing.assert_allclose(metrics["mean_abs_error"], 5.0 / 3.0, rtol=1e-6)
    assert float(metrics["denominator"]) == 3.0
