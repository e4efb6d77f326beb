"""Tests of the shared rollout plumbing: alignment, whitening and the PPO epoch schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps.rollout import (
    PPOUpdateConfig,
    ppo_epochs,
    predicting_logits,
    state_values,
    whiten,
)

# Two rows of L = 6: prompt of 2 (row 0) / 3 (row 1, one left pad) then responses of
# 3 and 2 tokens followed by padding.
RESPONSE_MASK = np.array([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0]], np.float32)


def test_state_values_reads_the_scalar_before_each_response_token():
    scalars = np.arange(12, dtype=np.float32).reshape(2, 6)
    values = np.asarray(state_values(jnp.asarray(scalars), jnp.asarray(RESPONSE_MASK)))
    expected = np.zeros_like(scalars)
    for b, t in zip(*np.nonzero(RESPONSE_MASK), strict=True):
        expected[b, t] = scalars[b, t - 1]  # V(x_<t) is read at column t - 1
    np.testing.assert_array_equal(values, expected)


def test_predicting_logits_shifts_by_one_column():
    logits = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    shifted = predicting_logits(logits)
    np.testing.assert_array_equal(shifted[:, 1:], logits[:, :-1])
    np.testing.assert_array_equal(shifted[:, 0], 0.0)


def test_whiten_standardises_the_masked_entries_only():
    values = jax.random.normal(jax.random.key(0), (2, 6)) * 3.0 + 5.0
    white = np.asarray(whiten(values, jnp.asarray(RESPONSE_MASK)))
    kept = white[RESPONSE_MASK > 0]
    # Exact up to float32 rounding and the ε = 1e-8 in the denominator.
    np.testing.assert_allclose(kept.mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(kept.std(), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(white[RESPONSE_MASK == 0], 0.0)


@pytest.mark.parametrize("epochs,num_minibatches,num_micro_batches", [(1, 1, 1), (3, 4, 2)])
def test_ppo_epochs_take_one_mean_gradient_step_per_minibatch(
    epochs, num_minibatches, num_micro_batches
):
    # Loss Σ_rows w·x_row (sum reduction, denominator = rows): each minibatch's gradient
    # is the mean of its rows. With SGD(1) and minibatches that partition the batch, one
    # epoch moves w by -Σ_m mean_m(x) = -M·mean(x), whatever the permutation.
    x = jax.random.normal(jax.random.key(1), (16,))

    def loss_fn(params, batch, rng):
        del rng
        return jnp.sum(params["w"] * batch["x"]), {"denominator": jnp.float32(batch["x"].size)}

    tx = optax.sgd(1.0)
    state = TrainState.create({"w": jnp.zeros(())}, tx, rng=0)
    config = PPOUpdateConfig(
        epochs=epochs, num_minibatches=num_minibatches, num_micro_batches=num_micro_batches
    )
    state, metrics = ppo_epochs(loss_fn, tx, state, {"x": x}, jax.random.key(2), config=config)
    expected = -epochs * num_minibatches * float(jnp.mean(x))
    np.testing.assert_allclose(float(state.params["w"]), expected, rtol=1e-5, atol=1e-6)
    assert not bool(metrics["nonfinite"])


def test_ppo_epochs_reject_an_indivisible_rollout():
    tx = optax.sgd(1.0)
    state = TrainState.create({"w": jnp.zeros(())}, tx, rng=0)
    with pytest.raises(ValueError, match="not divisible"):
        ppo_epochs(
            lambda p, b, r: (jnp.sum(p["w"] * b["x"]), {"denominator": jnp.float32(1)}),
            tx,
            state,
            {"x": jnp.ones(10)},
            jax.random.key(0),
            config=PPOUpdateConfig(num_minibatches=4),
        )
