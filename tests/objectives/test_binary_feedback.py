import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logit

from rlhf_jax.objectives import binary_feedback as bf
from rlhf_jax.tabular import core

# Positive-feedback rates of four (prompt, response) cells: sparse, as Love reactions are.
RATES = jnp.array([0.01, 0.05, 0.3, 0.7])
CELL_PROBS = jnp.array([0.4, 0.3, 0.2, 0.1])
# Float32 L-BFGS: the curvature of the population loss in cell x is ρ_x w p(1 − p) ≥ 4e-3
# and the iteration runs until the gradient is ~1e-7 (float32 noise), so the minimiser is
# exact to ≲ 1e-5 (observed: 1e-6, a few ulps of logits of size ~5); 1e-4 leaves slack.
ATOL = 1e-4


def population_loss(weights):
    """Exact expected weighted BCE over the table, as a function of the 4 logits."""
    labels = jnp.concatenate([jnp.ones(4), jnp.zeros(4)])
    mass = jnp.concatenate([CELL_PROBS * RATES, CELL_PROBS * (1 - RATES)])

    def loss(logits):
        both = jnp.concatenate([logits, logits])
        return bf.weighted_binary_cross_entropy(
            both, labels, mask=mass, reduction="sum", **weights
        )[0]

    return loss


def test_population_minimiser_is_the_true_logit_and_weighting_shifts_it_by_the_log_odds():
    overall = float(jnp.sum(CELL_PROBS * RATES))
    w_pos, w_neg = bf.balanced_class_weights(overall)
    # Total positive weight equals total negative weight, and the mean weight is 1.
    np.testing.assert_allclose(w_pos * overall, w_neg * (1 - overall), rtol=1e-6)
    np.testing.assert_allclose(w_pos * overall + w_neg * (1 - overall), 1.0, rtol=1e-6)
    cases = [
        dict(),
        dict(positive_weight=10.0, negative_weight=0.5),
        dict(positive_weight=w_pos, negative_weight=w_neg),
    ]
    losses = [population_loss(case) for case in cases]
    # One L-BFGS run over the three independent tables (one compilation).
    found = core.minimise(
        lambda s: sum(loss(s[k]) for k, loss in enumerate(losses)), jnp.zeros((3, 4))
    )
    true_logit = logit(np.asarray(RATES, np.float64))
    np.testing.assert_allclose(found[0], true_logit, atol=ATOL)
    np.testing.assert_allclose(found[1], true_logit + np.log(10.0 / 0.5), atol=ATOL)
    # Balanced weights move the minimiser by log(w₊/w₋) = −logit(overall positive rate).
    np.testing.assert_allclose(found[2], true_logit - logit(overall), atol=ATOL)
    # The calibration undoes the shift and gives P[Love] back.
    calibrated = bf.calibrated_logit(found[1], positive_weight=10.0, negative_weight=0.5)
    np.testing.assert_allclose(jax.nn.sigmoid(calibrated), RATES, atol=ATOL / 4)  # σ' ≤ 1/4


def test_weighted_bce_matches_direct_formula_and_metrics():
    logits = jnp.array([2.0, -1.0, 0.5, -3.0, 0.1])
    labels = jnp.array([True, False, False, True, True])
    mask = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0])
    loss, metrics = jax.jit(
        bf.weighted_binary_cross_entropy, static_argnames=("positive_weight", "reduction")
    )(logits, labels, positive_weight=3.0, mask=mask)
    s, y = np.asarray(logits, np.float64)[:4], np.asarray(labels, np.float64)[:4]
    per = 3.0 * y * np.log1p(np.exp(-s)) + (1 - y) * np.log1p(np.exp(s))
    np.testing.assert_allclose(loss, per.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["denominator"], 4.0)
    np.testing.assert_allclose(metrics["accuracy"], 0.5)  # right on 0 and 1
    np.testing.assert_allclose(metrics["positive_rate"], 0.5)
    np.testing.assert_allclose(metrics["mean_probability"], np.mean(1 / (1 + np.exp(-s))), 1e-6)


def test_love_reward_and_weighted_combination():
    s = jnp.array([-2.0, 0.0, 3.0])
    np.testing.assert_allclose(bf.love_reward(s), -np.log1p(np.exp(-np.asarray(s))), rtol=1e-6)
    np.testing.assert_array_equal(bf.love_reward(s, kind="logit"), s)
    np.testing.assert_allclose(bf.love_reward(s, kind="prob"), [0.11920292, 0.5, 0.95257413])
    with pytest.raises(ValueError, match="kind"):
        bf.love_reward(s, kind="odds")
    rewards = {"helpfulness": jnp.array([1.0, 2.0, 3.0]), "love": bf.love_reward(s)}
    combined = bf.combine_rewards(rewards, {"love": 0.25, "helpfulness": 1.0})
    np.testing.assert_allclose(combined, rewards["helpfulness"] + 0.25 * rewards["love"])
    with pytest.raises(ValueError, match=r"without a weight \['love'\]"):
        bf.combine_rewards(rewards, {"helpfulness": 1.0})
