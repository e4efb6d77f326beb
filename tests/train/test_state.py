"""TrainState, gradient accumulation and the non-finite guard on a least-squares model.

For the weighted least-squares loss L(w, b) = Σ_i m_i (x_i·w + b − y_i)² / Σ_i m_i the
gradient is closed form: ∇_w L = 2 Xᵀ(m ⊙ r) / Σ m, ∇_b L = 2 Σ(m ⊙ r) / Σ m.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.objectives.reduction import reduce_loss
from rlhf_jax.train.state import (
    TrainState,
    accumulate_gradients,
    make_gradient_step,
    split_micro_batches,
)

LEARNING_RATE = 0.1


def sum_loss(params, batch, rng):
    del rng
    residual = batch["x"] @ params["w"] + params["b"] - batch["y"]
    loss, denominator = reduce_loss(residual**2, batch["mask"], reduction="sum")
    return loss, {"denominator": denominator, "mean_residual": jnp.mean(residual)}


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.normal(size=(8, 3)).astype(np.float32),
        "y": rng.normal(size=(8,)).astype(np.float32),
        # Unequal weights per example: micro-batch denominators differ, so averaging
        # micro-batch means would be wrong; only sum / total denominator is right.
        "mask": np.array([1, 0, 1, 1, 0.5, 1, 0, 2], np.float32),
    }
    params = {"w": jnp.array([0.3, -0.2, 0.1]), "b": jnp.array(0.05)}
    return params, batch


def closed_form(params, batch):
    residual = batch["x"] @ np.asarray(params["w"]) + float(params["b"]) - batch["y"]
    m = batch["mask"]
    total = m.sum()
    loss = np.sum(m * residual**2) / total
    return loss, {
        "w": 2 * batch["x"].T @ (m * residual) / total,
        "b": 2 * np.sum(m * residual) / total,
    }


@pytest.fixture(scope="module")
def accumulate():
    return jax.jit(
        lambda params, batch, num: accumulate_gradients(
            sum_loss, params, split_micro_batches(batch, num), jax.random.key(0)
        ),
        static_argnums=2,
    )


@pytest.mark.parametrize("num_micro_batches", [1, 2, 8])
def test_accumulated_gradient_is_the_batch_mean_gradient(problem, accumulate, num_micro_batches):
    params, batch = problem
    loss, grads, metrics = accumulate(params, batch, num_micro_batches)
    expected_loss, expected_grads = closed_form(params, batch)
    # float32 sums of 8 terms of order 1: rounding stays far below 1e-6.
    np.testing.assert_allclose(loss, expected_loss, rtol=0, atol=1e-6)
    chex.assert_trees_all_close(grads, expected_grads, rtol=0, atol=1e-6)
    np.testing.assert_allclose(metrics["denominator"], batch["mask"].sum())


def test_eight_micro_batches_of_one_equal_one_batch_of_eight(problem, accumulate):
    params, batch = problem
    loss_1x8, grads_1x8, _ = accumulate(params, batch, 1)
    loss_8x1, grads_8x1, _ = accumulate(params, batch, 8)
    # Only the summation order differs: float32 rounding, well under 1e-6.
    np.testing.assert_allclose(loss_8x1, loss_1x8, rtol=0, atol=1e-6)
    chex.assert_trees_all_close(grads_8x1, grads_1x8, rtol=0, atol=1e-6)


def test_split_micro_batches_rejects_indivisible_batch(problem):
    with pytest.raises(ValueError, match="not divisible by num_micro_batches=3"):
        split_micro_batches(problem[1], 3)


@pytest.fixture(scope="module")
def adam_step():
    tx = optax.adam(LEARNING_RATE)
    return tx, jax.jit(make_gradient_step(sum_loss, tx, num_micro_batches=2))


def test_gradient_step_matches_optax_on_closed_form_gradient(problem, adam_step):
    params, batch = problem
    tx, step = adam_step
    state = TrainState.create(params, tx, 0, extra={"kl_coef": 0.1})
    new_state, metrics = step(state, batch, jax.random.key(1))
    _, grads = closed_form(params, batch)
    updates, opt_state = tx.update(grads, tx.init(params), params)
    # Adam's first step moves each coordinate by ~lr·sign(g): agreement to 1e-6
    # checks the step used the closed-form gradient's direction and scale.
    chex.assert_trees_all_close(
        new_state.params, optax.apply_updates(params, updates), rtol=0, atol=1e-6
    )
    chex.assert_trees_all_close(new_state.opt_state, opt_state, rtol=0, atol=1e-6)
    assert not metrics["nonfinite"]
    np.testing.assert_allclose(
        metrics["grad_norm"], np.sqrt(sum(np.sum(g**2) for g in grads.values())), rtol=1e-6
    )
    # The step counter belongs to the loop; algorithm state and key pass through.
    assert int(new_state.step) == 0
    np.testing.assert_array_equal(new_state.rng, state.rng)
    np.testing.assert_allclose(new_state.extra["kl_coef"], 0.1)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_nonfinite_batch_leaves_params_and_optimiser_unchanged(problem, adam_step, bad_value):
    params, batch = problem
    tx, step = adam_step
    state = TrainState.create(params, tx, 0)
    state, _ = step(state, batch, jax.random.key(1))  # a non-trivial optimiser state
    poisoned = {**batch, "y": batch["y"].copy()}
    poisoned["y"][3] = bad_value
    new_state, metrics = step(state, poisoned, jax.random.key(2))
    assert bool(metrics["nonfinite"])
    chex.assert_trees_all_equal(new_state.params, state.params)
    chex.assert_trees_all_equal(new_state.opt_state, state.opt_state)


def test_create_accepts_seed_raw_key_and_typed_key():
    tx = optax.sgd(1.0)
    from_seed = TrainState.create({"w": jnp.zeros(2)}, tx, 7).rng
    from_typed = TrainState.create({"w": jnp.zeros(2)}, tx, jax.random.key(7)).rng
    from_raw = TrainState.create({"w": jnp.zeros(2)}, tx, jax.random.PRNGKey(7)).rng
    np.testing.assert_array_equal(from_seed, from_typed)
    np.testing.assert_array_equal(from_seed, from_raw)
    assert from_seed.dtype == jnp.uint32
