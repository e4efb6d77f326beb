import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.tabular import core
from rlhf_jax.tabular import preference_optima as po

# Parity checks compare float32 objectives with float64 numpy on O(1) values through a
# handful of ops: rtol 1e-5 (1e-6 where both sides are float32 and the same operations).

P = jnp.array([0.1, 0.35, 0.6, 0.9])


def logistic(z):
    return -jax.nn.log_sigmoid(z)


def stationarity(expected_loss, z):
    """d/dz of an expected per-pair loss, evaluated elementwise (zero at an optimum to
    float32 rounding of O(1) terms: atol 1e-6)."""
    return jax.vmap(jax.grad(expected_loss))(z, P)


@pytest.mark.parametrize(("margin", "eps"), [(0.0, 0.0), (0.7, 0.0), (0.7, 0.15)])
def test_bradley_terry_optimal_difference_is_stationary(margin, eps):
    d = po.bradley_terry_optimal_difference(P, margin, eps)

    def expected(d, p):
        q = (1 - eps) * p + eps * (1 - p)
        return q * logistic(d - margin) + (1 - q) * logistic(-d - margin)

    np.testing.assert_allclose(stationarity(expected, d), 0.0, atol=1e-6)
    if margin == 0.0 and eps == 0.0:
        np.testing.assert_allclose(d, jax.scipy.special.logit(P), rtol=1e-5)


def test_label_noise_margins_are_stationary():
    eps = 0.05

    def cdpo(z, p):
        return p * ((1 - eps) * logistic(z) + eps * logistic(-z)) + (1 - p) * (
            (1 - eps) * logistic(-z) + eps * logistic(z)
        )

    def robust(z, p):
        per_label = lambda s: ((1 - eps) * logistic(s) - eps * logistic(-s)) / (1 - 2 * eps)  # noqa: E731
        return p * per_label(z) + (1 - p) * per_label(-z)

    def exo(z, p):
        q = jax.nn.sigmoid(z)
        kl = lambda t: q * jnp.log(q / t) + (1 - q) * jnp.log((1 - q) / (1 - t))  # noqa: E731
        return p * kl(1 - eps) + (1 - p) * kl(eps)

    for loss, margin in [
        (cdpo, po.conservative_dpo_optimal_margin(P, eps)),
        (robust, po.robust_dpo_optimal_margin(P, eps)),
        (exo, po.exo_optimal_margin(P, eps)),
    ]:
        np.testing.assert_allclose(stationarity(loss, margin), 0.0, atol=1e-6)
    # Flipping clean labels at rate ε and applying robust DPO's correction undoes the flips.
    noisy = (1 - eps) * P + eps * (1 - P)
    np.testing.assert_allclose(
        po.robust_dpo_optimal_margin(noisy, eps), jax.scipy.special.logit(P), rtol=1e-4
    )


def test_flip_labels_keeps_a_preference_table():
    task = core.make_task(jax.random.PRNGKey(0))
    noisy = po.flip_labels(task.preference, 0.2)
    np.testing.assert_allclose(noisy + jnp.swapaxes(noisy, -1, -2), 1.0, atol=1e-6)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jensen_shannon", "alpha"])
def test_f_divergence_optimum_is_normalised_and_stationary(divergence):
    task = core.make_task(jax.random.PRNGKey(1), num_prompts=2, num_responses=4)
    beta, alpha = 0.5, 0.3
    logp = po.f_divergence_optimum(task.ref_logp, task.reward, beta, divergence, alpha)
    np.testing.assert_allclose(jnp.sum(jnp.exp(logp), -1), 1.0, atol=1e-5)
    u = np.exp(np.asarray(logp, np.float64) - np.asarray(task.ref_logp, np.float64))
    f_prime = {
        "reverse_kl": np.log(u),
        "forward_kl": -1 / u,
        "jensen_shannon": np.log(2 * u / (1 + u)),
        "alpha": (1 - u ** (-alpha)) / alpha,
    }[divergence]
    # β f'(π*/π_ref) − r is a per-prompt constant (−λ).
    residual = beta * f_prime - np.asarray(task.reward)
    np.testing.assert_allclose(residual - residual.mean(-1, keepdims=True), 0.0, atol=1e-4)


def test_free_log_ratio_optima_are_stationary():
    task = core.make_task(jax.random.PRNGKey(2), num_prompts=2, num_responses=4)
    beta, shift = 0.5, 0.3
    win = core.preference_against(task.preference, task.ref_logp)
    checks = [
        (
            po.nca_optimal_log_ratio(task.preference, task.ref_logp, beta),
            lambda z, w: w * logistic(z) + 0.5 * logistic(-z),
        ),
        (
            po.bco_optimal_log_ratio(task.preference, task.ref_logp, beta, shift),
            lambda z, w: w * logistic(z - shift) + (1 - w) * logistic(shift - z),
        ),
        (
            po.sppo_hard_optimal_log_ratio(task.preference, task.ref_logp, beta),
            lambda z, w: w * (z / beta - 0.5 / beta) ** 2 + (1 - w) * (z / beta + 0.5 / beta) ** 2,
        ),
    ]
    for a, per_response in checks:
        grad = jax.vmap(jax.grad(per_response))((beta * a).ravel(), win.ravel())
        np.testing.assert_allclose(grad, 0.0, atol=1e-5)


def test_plackett_luce_rankings():
    scores = jax.random.normal(jax.random.PRNGKey(3), (2, 4))
    rankings, probs = po.plackett_luce_rankings(scores)
    assert rankings.shape == (24, 4)
    np.testing.assert_allclose(jnp.sum(probs, -1), 1.0, atol=1e-6)
    # The probability of being ranked first is softmax(scores).
    first = jnp.stack([jnp.sum(probs[:, rankings[:, 0] == y], -1) for y in range(4)], -1)
    np.testing.assert_allclose(first, jax.nn.softmax(scores, -1), atol=1e-6)
    _, two = po.plackett_luce_rankings(scores[:, :2])
    np.testing.assert_allclose(two[:, 0], jax.nn.sigmoid(scores[:, 0] - scores[:, 1]), atol=1e-6)


def test_all_pairs_follow_the_pair_weight_layout():
    table = jnp.arange(2 * 3, dtype=jnp.float32).reshape(2, 3)
    chosen, rejected = po.all_pairs(table)
    x, y, z = np.unravel_index(np.arange(18), (2, 3, 3))
    np.testing.assert_array_equal(chosen, table[x, y])
    np.testing.assert_array_equal(rejected, table[x, z])


def test_two_response_optimum_has_the_requested_margin():
    ref = core.log_policy(jax.random.normal(jax.random.PRNGKey(4), (3, 2)))
    margin = jnp.array([-1.0, 0.5, 2.0])
    logp = po.two_response_optimum(ref, margin, 0.5)
    h = (logp[:, 0] - ref[:, 0]) - (logp[:, 1] - ref[:, 1])
    np.testing.assert_allclose(0.5 * h, margin, rtol=1e-5)
