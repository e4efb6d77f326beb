"""The step distribution: mixing, temperature, top-k and top-p on controlled logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.sampling.processing import (
    combine_logits,
    sampling_log_probs,
    top_k_mask,
    top_p_mask,
)

# A controlled distribution in shuffled order: probabilities 0.4, 0.3, 0.15, 0.1, 0.05.
PROBS = np.array([0.1, 0.4, 0.05, 0.3, 0.15])
LOGITS = jnp.log(jnp.asarray(PROBS, jnp.float32)) + 3.0  # shift: logits need not be normalised
NUM_DRAWS = 20_000


def _draws(log_q):
    return np.asarray(jax.random.categorical(jax.random.key(0), log_q, shape=(NUM_DRAWS,)))


def _renormalised(kept):
    expected = np.where(kept, PROBS, 0.0)
    return expected / expected.sum()


def test_temperature_is_softmax_of_scaled_logits():
    # Closed form log_softmax(z / T); f32 round-off on O(1) values.
    for temperature in (0.3, 1.0, 2.5):
        expected = jax.nn.log_softmax(LOGITS / temperature)
        np.testing.assert_allclose(
            sampling_log_probs(LOGITS, temperature=temperature), expected, atol=1e-6
        )


@pytest.mark.parametrize("k, kept", [(1, [1]), (2, [1, 3]), (3, [1, 3, 4]), (9, range(5))])
def test_top_k_keeps_the_k_most_likely_and_renormalises(k, kept):
    allowed = np.isin(np.arange(5), list(kept))
    np.testing.assert_array_equal(top_k_mask(LOGITS, k), allowed)
    log_q = sampling_log_probs(LOGITS, top_k=k)
    # Renormalised probabilities p_i / Σ_kept p_j exactly (f32 round-off).
    np.testing.assert_allclose(jnp.exp(log_q), _renormalised(allowed), atol=1e-6)
    assert np.all(allowed[_draws(log_q)]), "a token outside the top-k set was drawn"


@pytest.mark.parametrize(
    "p, kept",
    [
        (0.3, [1]),  # the most likely token is always kept
        (0.6, [1, 3]),  # mass before 0.3 is 0.4 < 0.6; before 0.15 is 0.7
        (0.75, [1, 3, 4]),  # mass before 0.15 is 0.7 < 0.75; before 0.1 is 0.85
        (0.9, [1, 3, 4, 0]),
        (1.0, range(5)),
    ],
)
def test_top_p_keeps_the_nucleus_and_renormalises(p, kept):
    allowed = np.isin(np.arange(5), list(kept))
    log_probs = jax.nn.log_softmax(LOGITS)
    np.testing.assert_array_equal(top_p_mask(log_probs, p), allowed)
    log_q = sampling_log_probs(LOGITS, top_p=p)
    np.testing.assert_allclose(jnp.exp(log_q), _renormalised(allowed), atol=1e-6)
    assert np.all(allowed[_draws(log_q)]), "a token outside the nucleus was drawn"


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    # Top-2 renormalised: 0.4/0.7 = 0.571 then 0.3/0.7; with p = 0.5 the mass before the
    # second token (0.571) already reaches p, so only the most likely token is left, whereas
    # top-p alone at 0.5 would keep two tokens (mass before 0.3 is 0.4 < 0.5).
    log_q = sampling_log_probs(LOGITS, top_k=2, top_p=0.5)
    np.testing.assert_allclose(jnp.exp(log_q), np.eye(5)[1], atol=1e-6)


def test_temperature_is_applied_before_the_nucleus():
    # At T = 0.5 the probabilities become p² / Σ p² = (0.16, 0.09, ...) / 0.2775, so the
    # nucleus of mass 0.55 is the most likely token alone (0.577 mass before the second),
    # whereas at T = 1 it holds two tokens (0.4 mass before the second).
    log_q = sampling_log_probs(LOGITS, temperature=0.5, top_p=0.55)
    np.testing.assert_allclose(jnp.exp(log_q), np.eye(5)[1], atol=1e-6)


def test_combination_is_the_normalised_weighted_geometric_mixture():
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(3, 7)) * 2 for _ in range(3)]
    weights = np.array([0.5, 0.8, -0.3])
    probs = [np.exp(x - x.max(-1, keepdims=True)) for x in logits]
    probs = [p / p.sum(-1, keepdims=True) for p in probs]
    mixture = np.prod([p**w for p, w in zip(probs, weights, strict=True)], axis=0)
    mixture /= mixture.sum(-1, keepdims=True)
    combined = combine_logits(
        [jnp.asarray(x, jnp.float32) for x in logits], jnp.asarray(weights, jnp.float32)
    )
    # Independent float64 computation in probability space; f32 round-off on O(1) values.
    np.testing.assert_allclose(jnp.exp(jax.nn.log_softmax(combined)), mixture, atol=1e-6)


def test_combination_with_a_single_unit_weight_is_the_model():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9)), jnp.float32)
    combined = combine_logits([logits, 5.0 * logits], jnp.array([1.0, 0.0]))
    np.testing.assert_array_equal(combined, jax.nn.log_softmax(logits))
