import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.objectives import safe_rlhf
from rlhf_jax.tabular import constrained, core


def test_combined_advantage_formula():
    a_r = jnp.array([[1.0, -2.0], [0.5, 0.0]])
    a_c = jnp.array([[0.3, 1.0], [-1.0, 2.0]])
    lam = jnp.asarray(0.5)
    np.testing.assert_allclose(
        safe_rlhf.safe_rlhf_advantages(a_r, a_c, lam), (a_r - 0.5 * a_c) / 1.5, rtol=1e-6
    )
    np.testing.assert_allclose(
        safe_rlhf.safe_rlhf_advantages(a_r, a_c, lam, normalise=False), a_r - 0.5 * a_c
    )
    np.testing.assert_allclose(safe_rlhf.lagrangian_reward(a_r, a_c, lam), a_r - 0.5 * a_c)


def test_multiplier_updates():
    lam = safe_rlhf.lagrange_multiplier_update(
        jnp.asarray(0.3), jnp.asarray(0.1), threshold=0.5, learning_rate=1.0
    )
    assert float(lam) == 0.0  # projected onto λ ≥ 0
    lam = safe_rlhf.lagrange_multiplier_update(
        jnp.asarray(0.3), jnp.asarray(0.7), threshold=0.5, learning_rate=0.5
    )
    np.testing.assert_allclose(lam, 0.4, rtol=1e-6)
    log_lam = safe_rlhf.log_lagrange_multiplier_update(
        jnp.log(2.0), jnp.asarray(0.7), threshold=0.5, learning_rate=0.1
    )
    np.testing.assert_allclose(log_lam, jnp.log(2.0) + 0.1 * 2.0 * 0.2, rtol=1e-6)
    # It is gradient ascent on λ(J_C − d) in ln λ.
    grad = jax.grad(lambda u: jnp.exp(u) * (0.7 - 0.5))(jnp.log(2.0))
    np.testing.assert_allclose(log_lam - jnp.log(2.0), 0.1 * grad, rtol=1e-6)


def test_log_parameterised_primal_dual_reaches_the_constrained_optimum():
    # The ln λ update converges to the same saddle point as the projected one (tolerances
    # as in tests/tabular/test_constrained.py).
    task = core.make_task(jax.random.PRNGKey(0), 3, 5, with_cost=True)
    beta = 0.5
    unconstrained = core.kl_regularised_optimum(task.ref_logp, task.reward, beta)
    threshold = float(constrained.expected_cost(task, unconstrained)) - 0.5
    optimum, multiplier = constrained.constrained_optimum(task, beta=beta, threshold=threshold)
    logp, multipliers = constrained.run_primal_dual(
        task, beta=beta, threshold=threshold, multiplier_learning_rate=0.03, log_multiplier=True
    )
    np.testing.assert_allclose(multipliers[-1], multiplier, rtol=1e-3)
    assert float(jnp.sum(task.prompt_probs * core.kl(optimum, logp))) < 5e-5
