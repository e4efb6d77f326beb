import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.tabular import constrained, core

BETA = 0.5


@pytest.fixture(scope="module")
def task():
    return core.make_task(jax.random.PRNGKey(0), 3, 5, with_cost=True)


def _unconstrained(task):
    return core.kl_regularised_optimum(task.ref_logp, task.reward, BETA)


def test_bisection_optimum_is_the_constrained_maximiser(task):
    threshold = float(constrained.expected_cost(task, _unconstrained(task))) - 0.5
    logp, multiplier = constrained.constrained_optimum(task, beta=BETA, threshold=threshold)
    assert float(multiplier) > 0.0
    # Active constraint: the cost sits on the threshold (bisection to float32 resolution).
    np.testing.assert_allclose(constrained.expected_cost(task, logp), threshold, atol=1e-5)

    # KKT check by an independent solver: maximise the Lagrangian at λ* with L-BFGS.
    def negative_lagrangian(logits):
        lp = core.log_policy(logits)
        per_prompt = core.expected(lp, task.reward - multiplier * task.cost) - BETA * core.kl(
            lp, task.ref_logp
        )
        return -jnp.sum(task.prompt_probs * per_prompt)

    found = core.log_policy(core.minimise(negative_lagrangian, jnp.zeros_like(task.ref_logits)))
    np.testing.assert_allclose(jnp.exp(found), jnp.exp(logp), atol=1e-4)

    # No feasible policy among the Lagrangian family with higher objective: moving λ down
    # breaks the constraint, moving it up lowers the regularised reward.
    def objective(lp):
        per_prompt = core.expected(lp, task.reward) - BETA * core.kl(lp, task.ref_logp)
        return float(jnp.sum(task.prompt_probs * per_prompt))

    below = constrained.lagrangian_policy(
        task.ref_logp, task.reward, task.cost, multiplier - 0.05, beta=BETA
    )
    above = constrained.lagrangian_policy(
        task.ref_logp, task.reward, task.cost, multiplier + 0.05, beta=BETA
    )
    assert float(constrained.expected_cost(task, below)) > threshold
    assert objective(above) < objective(logp)


def test_primal_dual_converges_to_the_constrained_optimum(task):
    # Gradient descent-ascent with exact expectations; the slowest mode is the primal on
    # responses of probability ~1e-3 (softmax policy gradients scale with π). After 2000
    # steps λ is within 0.1% and KL(π* ‖ π_T) ≈ 1e-6; tolerances 1e-3 and 5e-5 leave a
    # margin while an unconstrained or mis-weighted solution is ≥ 1e-2 away.
    threshold = float(constrained.expected_cost(task, _unconstrained(task))) - 0.5
    optimum, multiplier = constrained.constrained_optimum(task, beta=BETA, threshold=threshold)
    logp, multipliers = constrained.run_primal_dual(task, beta=BETA, threshold=threshold)
    np.testing.assert_allclose(multipliers[-1], multiplier, rtol=1e-3)
    assert float(jnp.sum(task.prompt_probs * core.kl(optimum, logp))) < 5e-5
    assert float(jnp.sum(task.prompt_probs * core.kl(_unconstrained(task), logp))) > 1e-2
    np.testing.assert_allclose(constrained.expected_cost(task, logp), threshold, atol=1e-3)


def test_inactive_constraint_gives_zero_multiplier_and_the_unconstrained_optimum(task):
    threshold = float(constrained.expected_cost(task, _unconstrained(task))) + 0.3
    logp, multiplier = constrained.constrained_optimum(task, beta=BETA, threshold=threshold)
    assert float(multiplier) == 0.0
    np.testing.assert_allclose(logp, _unconstrained(task), atol=1e-6)
    final, multipliers = constrained.run_primal_dual(task, beta=BETA, threshold=threshold)
    assert float(multipliers[-1]) == 0.0  # projected onto λ ≥ 0 and stays there
    assert float(jnp.sum(task.prompt_probs * core.kl(_unconstrained(task), final))) < 5e-5
