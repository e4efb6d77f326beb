import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.tabular import mdp as tm

TEMPERATURE = 0.5


@pytest.fixture(scope="module")
def world():
    return tm.make_mdp(jax.random.PRNGKey(0), num_states=3, num_actions=2, discount=0.8)


def evaluate(world, policy, bonus):
    """V^π of r + bonus by a direct linear solve (independent of value iteration)."""
    P = np.asarray(world.transitions, np.float64)
    r = np.asarray(world.reward, np.float64) + bonus
    P_pi = np.einsum("sa,sat->st", policy, P)
    r_pi = np.sum(policy * r, axis=-1)
    return np.linalg.solve(np.eye(len(r_pi)) - world.discount * P_pi, r_pi)


def test_hard_value_iteration_matches_policy_evaluation_of_its_greedy_policy(world):
    q, v = tm.optimal_q(world)
    greedy = np.eye(world.num_actions)[np.argmax(np.asarray(q), -1)]
    # 400 iterations at γ = 0.8 leave a 0.8^400 error: the 1e-5 tolerance is float32 noise.
    np.testing.assert_allclose(v, evaluate(world, greedy, 0.0), atol=1e-5)
    # and no one-step deviation improves on it (Bellman optimality)
    backup = world.reward + world.discount * world.transitions @ v
    np.testing.assert_allclose(q, backup, atol=1e-5)


def test_soft_optimum_is_the_entropy_regularised_value_of_its_policy(world):
    logp = tm.soft_optimal_log_policy(world, temperature=TEMPERATURE)
    _, v = tm.optimal_q(world, temperature=TEMPERATURE)
    policy = np.exp(np.asarray(logp, np.float64))
    np.testing.assert_allclose(policy.sum(-1), 1.0, atol=1e-6)
    # V*(s) = E_π*[r − α log π* + γ P V*]: evaluate π* on the entropy-augmented reward.
    soft = evaluate(world, policy, -TEMPERATURE * np.asarray(logp, np.float64))
    np.testing.assert_allclose(v, soft, atol=1e-5)


def test_segments_are_a_distribution_and_sums_are_discounted(world):
    behaviour = jnp.log(jnp.full((3, 2), 0.5))
    states, actions, probs = tm.enumerate_segments(world, 2, behaviour)
    assert states.shape == (36, 2)
    np.testing.assert_allclose(jnp.sum(probs), 1.0, atol=1e-6)
    table = jax.random.normal(jax.random.PRNGKey(3), (3, 2))
    sums = tm.segment_sums(table, states, actions, 0.8)
    direct = table[states[:, 0], actions[:, 0]] + 0.8 * table[states[:, 1], actions[:, 1]]
    np.testing.assert_allclose(sums, direct, atol=1e-6)
