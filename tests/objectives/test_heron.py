import itertools

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.objectives import heron
from rlhf_jax.tabular import core

MARGINS = jnp.array([0.5, 0.25, 0.125])


def test_each_level_of_the_decision_tree():
    # Values are exact binary fractions so that "difference == margin" is exact.
    cases = [
        # (a, b, label, level)
        ([2.0, 0.0, 0.0], [1.0, 9.0, 9.0], 1.0, 0),  # level 0 decides despite b below
        ([1.0, 0.0, 9.0], [1.25, 0.5, 0.0], -1.0, 1),  # level 0 within margin; b wins 1
        ([1.0, 0.125, 0.5], [1.25, 0.0, 0.25], 1.0, 2),  # levels 0, 1 tie; a wins 2
        ([1.0, 0.0, 0.0], [1.25, 0.125, 0.0625], 0.0, 3),  # nothing decides
        ([1.5, 0.0, 0.0], [1.0, 0.0, 1.0], -1.0, 2),  # |Δ| == δ₀ does not decide
    ]
    a = jnp.array([c[0] for c in cases])
    b = jnp.array([c[1] for c in cases])
    label, level = jax.jit(heron.hierarchical_compare)(a, b, MARGINS)
    np.testing.assert_array_equal(label, [c[2] for c in cases])
    np.testing.assert_array_equal(level, [c[3] for c in cases])
    # Swapping the pair flips every label and keeps the deciding level.
    swapped_label, swapped_level = heron.hierarchical_compare(b, a, MARGINS)
    np.testing.assert_array_equal(swapped_label, -label)
    np.testing.assert_array_equal(swapped_level, level)
    # Zero margins: the first factor that differs at all decides (lexicographic order).
    lex_label, _ = heron.hierarchical_compare(a, b)
    expected = [
        np.sign(np.asarray(x) - y)[np.flatnonzero(np.asarray(x) != y)[0]]
        for x, y in zip(a, b, strict=True)
    ]
    np.testing.assert_array_equal(lex_label, expected)


def test_scaled_margins_are_multiples_of_each_factors_std():
    factors = jax.random.normal(jax.random.PRNGKey(0), (50, 3)) * jnp.array([1.0, 10.0, 0.1])
    margins = heron.scaled_margins(factors, jnp.array([0.5, 1.0, 2.0]))
    np.testing.assert_allclose(
        margins,
        np.array([0.5, 1.0, 2.0]) * np.std(np.asarray(factors, np.float64), 0),
        rtol=1e-5,
    )


def test_reward_loss_matches_direct_formula_and_skips_unlabelled_pairs():
    scores_a = jnp.array([0.3, -1.0, 2.0, 0.5])
    scores_b = jnp.array([0.1, 0.4, -0.5, 7.0])
    labels = jnp.array([1.0, -1.0, 0.0, 1.0])
    loss, metrics = heron.heron_reward_loss(scores_a, scores_b, labels)
    z = np.array([0.2, 1.4, -6.5])  # t·(s_a − s_b) on the three labelled pairs
    np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-z))), rtol=1e-5)
    np.testing.assert_allclose(metrics["denominator"], 3.0)
    np.testing.assert_allclose(metrics["accuracy"], 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["labelled_fraction"], 0.75)


def test_reward_model_trained_on_heron_labels_orders_responses_as_the_hierarchy():
    # Six responses: the top factor takes three well-separated values, ties within each
    # value are broken by the second factor, and the third factor points the other way
    # (a weighted sum that overweights it would order them differently).
    factors = jnp.array(
        [
            [0.0, 1.0, 9.0],
            [0.0, 2.0, 8.0],
            [1.0, 0.0, 7.0],
            [1.0, 3.0, 6.0],
            [2.0, 1.0, 5.0],
            [2.0, 2.0, 4.0],
        ]
    )
    hierarchy_order = np.arange(6)  # listed from worst to best by the hierarchy
    pairs = np.array(list(itertools.combinations(range(6), 2)))
    labels, _ = heron.hierarchical_compare(factors[pairs[:, 0]], factors[pairs[:, 1]], MARGINS)
    assert bool(jnp.all(labels != 0))

    def population(scores):
        loss, _ = heron.heron_reward_loss(scores[pairs[:, 0]], scores[pairs[:, 1]], labels)
        # A small ridge keeps the optimum finite on these noise-free, separable labels;
        # on a complete transitive tournament it does not change the order.
        return loss + 1e-3 * jnp.sum(scores**2)

    scores = core.minimise(population, jnp.zeros(6))
    np.testing.assert_array_equal(np.argsort(np.asarray(scores)), hierarchy_order)
    assert float(jnp.min(jnp.diff(scores))) > 0.1
