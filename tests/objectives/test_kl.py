import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.objectives import kl


@pytest.fixture(scope="module")
def categorical():
    k_p, k_q, k_s = jax.random.split(jax.random.PRNGKey(0), 3)
    logp = jax.nn.log_softmax(0.7 * jax.random.normal(k_p, (6,)))
    ref_logp = jax.nn.log_softmax(0.7 * jax.random.normal(k_q, (6,)))
    samples = jax.random.categorical(k_s, logp, shape=(200_000,))
    return logp, ref_logp, samples


def _exact_moments(values, probs):
    mean = jnp.sum(probs * values)
    return mean, jnp.sum(probs * (values - mean) ** 2)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_unbiased_estimators_match_the_exact_kl(categorical, estimator):
    logp, ref_logp, samples = categorical
    exact_kl = jnp.sum(jnp.exp(logp) * (logp - ref_logp))
    per_response = kl.kl_estimate(logp, ref_logp, estimator=estimator)
    mean, variance = _exact_moments(per_response, jnp.exp(logp))
    np.testing.assert_allclose(mean, exact_kl, rtol=1e-5)  # unbiased: exact expectation
    # Monte Carlo mean: 5 standard errors from the estimator's exact variance (p ≈ 6e-7).
    estimate = jnp.mean(per_response[samples])
    assert abs(float(estimate - exact_kl)) < 5 * float(jnp.sqrt(variance / samples.size))


def test_k2_is_biased_towards_the_half_squared_log_ratio(categorical):
    logp, ref_logp, samples = categorical
    per_response = kl.kl_k2(logp, ref_logp)
    mean, variance = _exact_moments(per_response, jnp.exp(logp))
    np.testing.assert_allclose(
        mean, jnp.sum(jnp.exp(logp) * 0.5 * (logp - ref_logp) ** 2), rtol=1e-6
    )
    estimate = jnp.mean(per_response[samples])
    assert abs(float(estimate - mean)) < 5 * float(jnp.sqrt(variance / samples.size))
    # Second-order agreement: for π_ref = π·exp(εg)/Z the k2 bias is O(ε³) vs KL = O(ε²).
    g = jnp.array([0.3, -0.5, 0.1, 0.9, -0.2, 0.0])
    for eps in (0.1, 0.05):
        close_ref = jax.nn.log_softmax(logp + eps * g)
        exact = jnp.sum(jnp.exp(logp) * (logp - close_ref))
        k2_mean = jnp.sum(jnp.exp(logp) * kl.kl_k2(logp, close_ref))
        assert abs(float(k2_mean - exact)) < 0.1 * float(exact)


def test_k3_is_non_negative_and_zero_on_equal_log_probs():
    logp = jax.random.normal(jax.random.PRNGKey(1), (4, 9)) * 3.0
    ref_logp = jax.random.normal(jax.random.PRNGKey(2), (4, 9)) * 3.0
    assert float(jnp.min(kl.kl_k3(logp, ref_logp))) >= 0.0
    assert float(jnp.max(jnp.abs(kl.kl_k3(logp, logp)))) == 0.0
    assert float(jnp.min(kl.kl_k2(logp, ref_logp))) >= 0.0


def test_kl_loss_reduction_and_penalised_rewards():
    logp = jax.random.normal(jax.random.PRNGKey(3), (3, 5))
    ref_logp = jax.random.normal(jax.random.PRNGKey(4), (3, 5))
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]], jnp.float32)
    loss_sum, metrics = jax.jit(lambda a, b, m: kl.kl_loss(a, b, m, reduction="sum"))(
        logp, ref_logp, mask
    )
    loss_mean, _ = kl.kl_loss(logp, ref_logp, mask)
    np.testing.assert_allclose(metrics["denominator"], 10.0)
    np.testing.assert_allclose(loss_sum / 10.0, loss_mean, rtol=1e-6)
    np.testing.assert_allclose(loss_sum, jnp.sum(kl.kl_k3(logp, ref_logp) * mask), rtol=1e-6)
    scores = jnp.array([1.0, -2.0, 0.5])
    rewards = kl.kl_penalised_rewards(scores, logp, ref_logp, mask, kl_coef=0.1)
    # Each row sums to score − β Σ_t k1_t over the response, and the score sits on the
    # last response token (index 2, 4, 2).
    np.testing.assert_allclose(
        jnp.sum(rewards, axis=1),
        scores - 0.1 * jnp.sum((logp - ref_logp) * mask, axis=1),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        rewards[jnp.arange(3), jnp.array([2, 4, 2])]
        + 0.1 * (logp - ref_logp)[jnp.arange(3), jnp.array([2, 4, 2])],
        scores,
        rtol=1e-5,
    )
    assert float(jnp.max(jnp.abs(rewards * (1 - mask)))) == 0.0
