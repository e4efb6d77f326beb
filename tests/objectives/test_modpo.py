import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.objectives import modpo, pairwise
from rlhf_jax.tabular import core
from rlhf_jax.tabular import preference_optima as po

# Parity checks compare float32 objectives with float64 numpy on O(1) values through a
# handful of ops: rtol 1e-5 (1e-6 where both sides are float32 and the same operations).


def test_modpo_optimum_is_the_weighted_reward_optimum():
    beta, preference_weight = 0.5, 0.6
    margin_weights = jnp.array([0.3, 0.1])
    key_task, key_rewards = jax.random.split(jax.random.PRNGKey(0))
    task = core.make_task(key_task, num_prompts=2, num_responses=4)
    other_rewards = jax.random.normal(key_rewards, (2, 4, 2))  # [X, Y, M] given reward models
    # Preferences express the task's reward r_k; pairs from π_ref.
    weights = po.pair_weights(task.prompt_probs, task.ref_logp, task.preference)
    chosen_rewards = jnp.broadcast_to(other_rewards[:, :, None, :], (2, 4, 4, 2))
    rejected_rewards = jnp.broadcast_to(other_rewards[:, None, :, :], (2, 4, 4, 2))

    def single(pc, pr, rc, rr, margin_c, margin_r):
        return modpo.modpo_loss(
            pc[None],
            pr[None],
            rc[None],
            rr[None],
            margin_c[None],
            margin_r[None],
            margin_weights=margin_weights,
            preference_weight=preference_weight,
            beta=beta,
            reduction="sum",
        )[0]

    def population(logits):
        return po.pairwise_population_loss(
            jax.vmap(single),
            core.log_policy(logits),
            task.ref_logp,
            weights,
            (chosen_rewards, rejected_rewards),
        )

    found = core.log_policy(core.minimise(population, jnp.zeros_like(task.ref_logits)))
    combined = preference_weight * task.reward + other_rewards @ margin_weights
    expected = core.kl_regularised_optimum(task.ref_logp, combined, beta)
    # Float32 L-BFGS on an exact population loss (see test_pairwise): 1e-3 in probabilities.
    np.testing.assert_allclose(jnp.exp(found), jnp.exp(expected), atol=1e-3)


def test_modpo_without_margin_models_is_dpo_with_rescaled_beta():
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    pc, pr, rc, rr = (-jnp.abs(jax.random.normal(k, (5,))) * 4 for k in keys)
    zero = jnp.zeros((5, 1))
    loss, metrics = jax.jit(
        lambda *a: modpo.modpo_loss(
            *a, zero, zero, margin_weights=jnp.ones(1), preference_weight=0.5, beta=0.2
        )
    )(pc, pr, rc, rr)
    dpo, dpo_metrics = pairwise.dpo_loss(pc, pr, rc, rr, beta=0.4)
    np.testing.assert_allclose(loss, dpo, rtol=1e-6)
    np.testing.assert_allclose(metrics["reward_accuracy"], dpo_metrics["reward_accuracy"])
    np.testing.assert_allclose(metrics["denominator"], 5.0)
    grouped, _ = jax.vmap(
        lambda *a: modpo.modpo_loss(*a, margin_weights=jnp.ones(1), preference_weight=0.5, beta=0.2)
    )(
        pc.reshape(1, 5),
        pr.reshape(1, 5),
        rc.reshape(1, 5),
        rr.reshape(1, 5),
        zero[None],
        zero[None],
    )
    np.testing.assert_allclose(grouped[0], loss, rtol=1e-6)
