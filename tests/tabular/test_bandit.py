import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.tabular import bandit, core


@pytest.fixture(scope="module")
def task():
    return core.make_task(jax.random.PRNGKey(0), num_prompts=3, num_responses=5)


@pytest.mark.parametrize(("beta", "clip_eps"), [(0.7, 0.2), (1.0, 0.05)])
def test_kl_penalised_ppo_converges_to_the_gibbs_optimum(task, beta, clip_eps):
    # The fixed point of exact KL-in-reward PPO is π* ∝ π_ref exp(r/β) (the surrogate's
    # gradient at π = π_old is the exact gradient of E[r] − β KL, which vanishes only at
    # π*, whatever the clip width). The objective is β-strongly concave in π, so gradient
    # descent converges linearly; after 300 iterations the KL is at float32 round-off
    # (~1e-8). 1e-6 in KL and 1e-4 in probabilities (KL ≈ ½ Σ δ²/π, so δ ~ 1e-5 at the
    # measured KL) leave a margin, while the unregularised argmax or a wrong β is O(0.1) away.
    logp, distances = bandit.run_kl_ppo(task, beta=beta, clip_eps=clip_eps)
    optimum = core.kl_regularised_optimum(task.ref_logp, task.reward, beta)
    assert float(distances[-1]) < 1e-6
    assert float(distances[0]) > 0.1
    np.testing.assert_allclose(jnp.exp(logp), jnp.exp(optimum), atol=1e-4)


def test_surrogate_gradient_at_old_policy_is_the_exact_objective_gradient(task):
    beta = 0.3
    logits = jax.random.normal(jax.random.PRNGKey(1), task.ref_logits.shape)
    old_logp = core.log_policy(logits)
    advantages = bandit.kl_penalised_advantages(old_logp, task.ref_logp, task.reward, beta=beta)
    surrogate_grad = jax.jit(jax.grad(bandit.exact_ppo_loss), static_argnames="clip_eps")(
        logits, old_logp, advantages, task.prompt_probs, clip_eps=0.2
    )

    def objective(lg):
        logp = core.log_policy(lg)
        per_prompt = core.expected(logp, task.reward) - beta * core.kl(logp, task.ref_logp)
        return jnp.sum(task.prompt_probs * per_prompt)

    np.testing.assert_allclose(-surrogate_grad, jax.jit(jax.grad(objective))(logits), atol=1e-6)
