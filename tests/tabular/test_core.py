import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.tabular import core


def test_kl_regularised_optimum_maximises_reward_minus_kl():
    task = core.make_task(jax.random.PRNGKey(0), num_prompts=3, num_responses=5)
    beta = 0.5

    def negative_objective(logits):
        logp = core.log_policy(logits)
        return -jnp.sum(core.expected(logp, task.reward) - beta * core.kl(logp, task.ref_logp))

    found = core.log_policy(core.minimise(negative_objective, jnp.zeros_like(task.ref_logits)))
    np.testing.assert_allclose(
        found, core.kl_regularised_optimum(task.ref_logp, task.reward, beta), atol=1e-4
    )


def test_bradley_terry_table_is_a_preference():
    task = core.make_task(jax.random.PRNGKey(1))
    p = task.preference
    np.testing.assert_allclose(p + jnp.swapaxes(p, -1, -2), 1.0, atol=1e-6)
    np.testing.assert_allclose(jnp.diagonal(p, axis1=-2, axis2=-1), 0.5, atol=1e-7)


def test_sampled_pairs_follow_the_preference():
    task = core.make_task(jax.random.PRNGKey(2), num_prompts=1, num_responses=2)
    pairs = core.sample_pairs(jax.random.PRNGKey(3), task, task.ref_logp, 20_000)
    distinct = pairs["chosen"] != pairs["rejected"]
    win_rate_of_0 = jnp.sum(distinct & (pairs["chosen"] == 0)) / jnp.sum(distinct)
    # Binomial standard error on ~10k distinct pairs is below 0.005; allow 4 sigma.
    np.testing.assert_allclose(win_rate_of_0, task.preference[0, 0, 1], atol=0.02)
