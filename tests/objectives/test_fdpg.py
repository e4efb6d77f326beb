import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.objectives import fdpg
from rlhf_jax.tabular import core

BETA = 1.0


@pytest.fixture(scope="module")
def world():
    task = core.make_task(jax.random.PRNGKey(0), num_prompts=2, num_responses=4)
    log_scores = task.ref_logp + task.reward / BETA  # log P = log π_ref + r/β
    log_z = jnp.broadcast_to(jax.nn.logsumexp(log_scores, -1, keepdims=True), log_scores.shape)
    return task, log_scores, log_z


def population_surrogate(logits, proposal_logp, world, divergence):
    """The estimator averaged exactly: samples weighted by ρ(x) q(y|x)."""
    task, log_scores, log_z = world
    weights = task.prompt_probs[:, None] * jnp.exp(proposal_logp)
    loss, _ = fdpg.fdpg_loss(
        core.log_policy(logits).reshape(-1),
        proposal_logp.reshape(-1),
        log_scores.reshape(-1),
        log_z.reshape(-1),
        divergence=divergence,
        weights=weights.reshape(-1),
        reduction="sum",
    )
    return loss


def exact_divergence(logits, world, divergence):
    """ρ-weighted D_f(π ‖ p) = Σ_x ρ(x) Σ_y p f(π/p), written out independently."""
    task, log_scores, log_z = world
    logp, target = core.log_policy(logits), log_scores - log_z
    pi, p = jnp.exp(logp), jnp.exp(target)
    per_prompt = {
        "forward_kl": jnp.sum(p * (target - logp), -1),
        "reverse_kl": jnp.sum(pi * (logp - target), -1),
        "jensen_shannon": 0.5
        * jnp.sum(pi * jnp.log(2 * pi / (pi + p)) + p * jnp.log(2 * p / (pi + p)), -1),
        "total_variation": 0.5 * jnp.sum(jnp.abs(pi - p), -1),
    }[divergence]
    return jnp.sum(task.prompt_probs * per_prompt)


@pytest.mark.parametrize("divergence", fdpg.DIVERGENCES)
def test_estimator_is_the_exact_gradient_on_and_off_policy(world, divergence):
    task = world[0]
    logits = jax.random.normal(jax.random.PRNGKey(1), task.ref_logits.shape)
    exact = jax.grad(exact_divergence)(logits, world, divergence)
    on_policy = jax.grad(
        lambda z: population_surrogate(
            z, jax.lax.stop_gradient(core.log_policy(z)), world, divergence
        )
    )(logits)
    off_policy = jax.grad(population_surrogate)(logits, task.ref_logp, world, divergence)
    # Both are the same finite sums computed in float32 in different orders: 1e-5.
    np.testing.assert_allclose(on_policy, exact, atol=1e-5)
    np.testing.assert_allclose(off_policy, exact, atol=1e-5)


@functools.partial(jax.jit, static_argnames=("divergence", "steps"))
def descend(logits, proposal_logp, world, divergence, steps):
    grad = jax.grad(population_surrogate)
    # Subgradient steps for TV (f' is a sign): a 1/√t schedule; constant steps otherwise.
    decay = 0.5 if divergence == "total_variation" else 0.0
    lr = 1.0 if divergence == "total_variation" else 2.0

    def body(z, i):
        return z - lr / (1.0 + i) ** decay * grad(z, proposal_logp, world, divergence), None

    return jax.lax.scan(body, logits, jnp.arange(steps, dtype=jnp.float32))[0]


@pytest.mark.parametrize("divergence", fdpg.DIVERGENCES)
def test_gradient_descent_on_each_divergence_reaches_the_target(world, divergence):
    task = world[0]
    target = core.kl_regularised_optimum(task.ref_logp, task.reward, BETA)
    # Off policy, with the fixed proposal q = π_ref (the estimator's importance weights
    # make the exact gradient independent of q).
    final = descend(task.ref_logits, task.ref_logp, world, divergence, 2000)
    error = jnp.max(jnp.abs(jnp.exp(core.log_policy(final)) - jnp.exp(target)))
    # The smooth divergences converge linearly (error ~1e-7 after 2000 steps; 1e-5 is
    # float32 noise). TV's subgradient method oscillates within O(step) of p: the last
    # step is 1/√2000 ≈ 0.02 times a gradient bounded by ½·π, so 2e-3 on probabilities.
    tolerance = 2e-3 if divergence == "total_variation" else 1e-5
    assert error < tolerance, error


def test_importance_partition_is_exact_with_the_target_as_proposal():
    scores = jnp.array([0.3, -1.0, 2.0])
    log_z = jax.nn.logsumexp(scores)
    # q = P/Z makes every weight P/q equal to Z, so the estimate is exact.
    np.testing.assert_allclose(
        fdpg.importance_log_partition(scores, scores - log_z), log_z, rtol=1e-6
    )
