import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.tabular import core
from rlhf_jax.tabular import sequence as sq

V, T = 3, 3


@pytest.fixture(scope="module")
def logits():
    return jax.random.normal(jax.random.PRNGKey(0), (T, V ** (T - 1), V))


def test_sequence_probabilities_are_products_of_token_conditionals(logits):
    logp = sq.sequence_log_probs(logits)
    np.testing.assert_allclose(jnp.sum(jnp.exp(logp)), 1.0, atol=1e-6)
    token = jax.nn.log_softmax(logits, -1)
    # y = (2, 0, 1): prefix codes () -> 0, (2,) -> 2, (2, 0) -> 6; sequence index 2·9 + 0·3 + 1
    direct = token[0, 0, 2] + token[1, 2, 0] + token[2, 6, 1]
    np.testing.assert_allclose(logp[2 * 9 + 0 * 3 + 1], direct, atol=1e-6)


def test_token_conditionals_invert_sequence_probabilities(logits):
    logp = sq.sequence_log_probs(logits)
    recovered = sq.token_conditionals(logp, V, T)
    # float32 round trip through sums of probabilities: 1e-5 relative.
    np.testing.assert_allclose(sq.sequence_log_probs(recovered), logp, atol=1e-5)


def test_prefix_probabilities_are_marginals(logits):
    reach = sq.prefix_probs(logits)
    probs = jnp.exp(sq.sequence_log_probs(logits)).reshape(V, V, V)
    np.testing.assert_allclose(reach[0, 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(reach[1, :V], probs.sum((1, 2)), atol=1e-6)
    np.testing.assert_allclose(reach[2], probs.sum(2).reshape(-1), atol=1e-6)


def test_soft_bellman_recursion_gives_the_kl_regularised_optimum(logits):
    beta = 0.7
    reward = jax.random.normal(jax.random.PRNGKey(1), (V**T,))
    optimum = core.kl_regularised_optimum(sq.sequence_log_probs(logits)[None], reward[None], beta)
    rewards = jnp.zeros_like(logits).at[T - 1].set(reward.reshape(V ** (T - 1), V))
    token = sq.soft_optimal_token_logp(logits, rewards, beta)
    np.testing.assert_allclose(sq.sequence_log_probs(token), optimum[0], atol=1e-5)
