"""Tests for fine-grained RLHF rewards: placement, combination, GAE, and real QA-Feedback spans."""

import gzip
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.data.builders.qa_feedback import ERROR_TYPES, bundled_dev_dir, error_token_labels
from rlhf_jax.data.tokenizers import ByteTokenizer
from rlhf_jax.objectives import fine_grained
from rlhf_jax.objectives.advantages import gae_advantages

FIXTURE = bundled_dev_dir() / "dev_feedback.json.gz"

MASK = jnp.array([[0, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 1, 1, 0, 0]], jnp.float32)
# Row 0: segments {1,2}, {3}, {4,5,6}; row 1: {0}, {1,2,4} (position 3 masked), {5}.
IDS_A = jnp.array([[0, 0, 0, 1, 2, 2, 2, 0], [0, 1, 1, 9, 1, 2, 0, 0]])
ENDS_A = np.array([[0, 0, 1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1, 0, 0]], bool)
# A coarser model: one segment per response.
IDS_B = jnp.zeros((2, 8), jnp.int32)


@pytest.fixture(scope="module")
def records():
    with gzip.open(FIXTURE, "rt", encoding="utf-8") as f:
        return json.load(f)


def test_segment_ends_are_last_tokens_of_segments():
    np.testing.assert_array_equal(fine_grained.segment_ends(MASK, IDS_A), ENDS_A)


def test_rewards_only_at_segment_ends_and_combination_is_weighted_sum():
    rewards_a = jnp.array([[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]])
    rewards_b = jnp.array([[10.0], [-7.0]])
    placed_a = fine_grained.place_segment_rewards(rewards_a, IDS_A, MASK)
    expected_a = np.zeros((2, 8), np.float32)
    expected_a[0, [2, 3, 6]] = [1.0, -2.0, 3.0]
    expected_a[1, [0, 4, 5]] = [0.5, 4.0, -1.0]
    np.testing.assert_array_equal(placed_a, expected_a)
    placed_b = fine_grained.place_segment_rewards(rewards_b, IDS_B, MASK)
    expected_b = np.zeros((2, 8), np.float32)
    expected_b[0, 6], expected_b[1, 5] = 10.0, -7.0
    np.testing.assert_array_equal(placed_b, expected_b)
    combined = fine_grained.combine_segment_rewards(
        [rewards_a, rewards_b], [IDS_A, IDS_B], MASK, [0.3, 0.5]
    )
    # Exact up to one float32 rounding per product/sum.
    np.testing.assert_allclose(combined, 0.3 * expected_a + 0.5 * expected_b, rtol=1e-6)


def test_gae_with_dense_rewards_matches_numpy_reference():
    # Jitted, with the weights traced: the combination is a pure array function.
    rewards = jax.jit(fine_grained.combine_segment_rewards)(
        [jnp.array([[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]]), jnp.array([[10.0], [-7.0]])],
        [IDS_A, IDS_B],
        MASK,
        [1.0, 0.5],
    )
    values = jax.random.normal(jax.random.PRNGKey(0), (2, 8))
    gamma, lam = 0.95, 0.9
    adv, _ = gae_advantages(rewards, values, MASK, gamma=gamma, lam=lam)
    r, v, m = (np.asarray(x, np.float64) for x in (rewards, values, MASK))
    expected = np.zeros_like(r)
    for b in range(2):
        steps = np.flatnonzero(m[b])
        running, next_value = 0.0, 0.0
        for t in steps[::-1]:
            running = r[b, t] + gamma * next_value - v[b, t] + gamma * lam * running
            expected[b, t], next_value = running, v[b, t]
    # float32 recursion over ≤ 8 steps: 1e-5 relative.
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-5)


def test_error_labels_and_sentence_ends_on_real_qa_feedback(records):
    tokenizer = ByteTokenizer()
    checked = 0
    for record in records[:6]:
        text = record["prediction 1"]
        errors = record["feedback"]["errors"]
        spans = [(e["start"], e["end"], e["error type"]) for e in errors]
        _, token_labels = error_token_labels(text, spans, tokenizer)
        _, offsets = tokenizer.encode_with_offsets(text)
        # Independent check: characters covered by each type's spans.
        for k, name in enumerate(ERROR_TYPES):
            covered = np.zeros(len(text) + 1, bool)
            for start, end, kind in spans:
                if kind == name:
                    covered[start:end] = True
            expected = covered[offsets[:, 0]]
            np.testing.assert_array_equal(token_labels[:, k], expected)
        sentences = fine_grained.sentence_spans(text)
        assert len(sentences) >= 2
        ids = fine_grained.token_segment_ids(offsets, sentences)
        mask = jnp.ones((1, len(ids)))
        ends = np.asarray(fine_grained.segment_ends(mask, ids[None]))[0]
        # Last token of each sentence: the last byte of its last character.
        last_tokens = [int(np.flatnonzero(offsets[:, 0] == end - 1)[-1]) for _, end in sentences]
        assert np.flatnonzero(ends).tolist() == last_tokens
        assert all(text[end - 1] in ".!?\"')]" for _, end in sentences[:-1])
        # Segment labels: a sentence has an error type iff one of its characters does.
        labels = np.asarray(fine_grained.segment_labels(token_labels, ids, len(sentences)))
        for j, (start, end) in enumerate(sentences):
            for k, name in enumerate(ERROR_TYPES):
                overlaps = any(a < end and b > start for a, b, kind in spans if kind == name)
                assert labels[j, k] == overlaps
        checked += bool(errors)
    assert checked >= 3  # the check exercised records with annotated errors
