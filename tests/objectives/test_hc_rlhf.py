"""Tests for HC-RLHF: Student-t bounds against scipy, the safety guarantee by simulation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from rlhf_jax.objectives import hc_rlhf
from rlhf_jax.tabular.core import log_policy

SIZES = np.array([2, 3, 5, 12, 20, 21, 31, 101, 2000])
DELTAS = np.array([0.2, 0.1, 0.05, 0.025, 0.01, 0.001])


def test_student_t_quantile_matches_scipy():
    df, delta = np.meshgrid(SIZES - 1.0, DELTAS, indexing="ij")
    upper, lower = jax.jit(
        lambda a, d: (hc_rlhf.student_t_upper_quantile(a, d), hc_rlhf.student_t_quantile(a, d))
    )(delta, df)
    # float32 bisection on betainc (ν < 20) or Cornish–Fisher to ν⁻⁴ (ν ≥ 20): < 1e-5.
    np.testing.assert_allclose(upper, stats.t.ppf(1 - delta, df), rtol=1e-5)
    np.testing.assert_allclose(lower, stats.t.ppf(delta, df), rtol=1e-5)


def test_student_t_upper_bound_matches_scipy():
    rng = np.random.default_rng(0)
    samples = rng.normal(1.0, 2.0, size=(len(SIZES), SIZES.max()))
    mask = np.arange(SIZES.max())[None, :] < SIZES[:, None]
    got = jax.jit(
        jax.vmap(
            lambda x, m: jax.vmap(lambda d: hc_rlhf.student_t_upper_bound(x, delta=d, mask=m))(
                jnp.asarray(DELTAS[:3], jnp.float32)
            )
        )
    )(jnp.asarray(samples, jnp.float32), jnp.asarray(mask))
    for i, n in enumerate(SIZES):
        x = samples[i, :n]
        want = x.mean() + stats.t.ppf(1 - DELTAS[:3], n - 1) * x.std(ddof=1) / np.sqrt(n)
        # float32 mean/std over ≤ 2000 samples plus the quantile's 1e-5.
        np.testing.assert_allclose(got[i], want, rtol=2e-5, atol=1e-5)


def test_pessimistic_bound_and_masking():
    costs = jnp.asarray(np.random.default_rng(0).normal(size=40), jnp.float32)
    mask = jnp.arange(40) < 30
    got = jax.jit(
        functools.partial(
            hc_rlhf.pessimistic_cost_bound,
            delta=0.05,
            safety_size=50,
            candidate_coef=1.5,
            safety_coef=2.0,
        )
    )(costs, mask=mask)
    c = np.asarray(costs[:30], np.float64)
    width = 1.5 * stats.t.ppf(0.95, 29) / np.sqrt(30) + 2.0 * stats.t.ppf(0.95, 49) / np.sqrt(50)
    np.testing.assert_allclose(got, c.mean() + width * c.std(ddof=1), rtol=1e-5)


def test_pessimistic_per_sample_cost_has_the_bound_gradient():
    # Exact expectations on a one-prompt table: E_π[∇log π · c̃] = ∇(μ + κσ) under π.
    cost = jnp.array([0.2, 1.5, -0.3, 0.9, 2.0])
    logits = jnp.array([0.1, -0.4, 0.7, 0.0, 0.3])
    kappa = 0.8

    def bound(z):
        p = jnp.exp(log_policy(z[None]))[0]
        mean = jnp.sum(p * cost)
        return mean + kappa * jnp.sqrt(jnp.sum(p * (cost - mean) ** 2))

    probs = jnp.exp(log_policy(logits[None]))[0]
    augmented = hc_rlhf.pessimistic_cost_per_sample(cost, coef=kappa, weights=probs)

    def surrogate(z):
        return jnp.sum(probs * log_policy(z[None])[0] * augmented)

    # Same quantity by two float32 routes over 5 entries: 1e-5.
    np.testing.assert_allclose(
        jax.grad(surrogate)(logits), jax.grad(bound)(logits), rtol=1e-5, atol=1e-6
    )


def _allowance(delta, trials, false_alarm=1e-4):
    """Largest frequency a binomial(trials, δ) exceeds with probability < false_alarm."""
    return stats.binom.ppf(1.0 - false_alarm, trials, delta) / trials


def test_unsafe_candidate_passes_the_safety_test_at_most_delta_of_the_time():
    # Adversarial candidate selection: the candidate always has true mean cost just above
    # the threshold, and the t-test must pass it at most δ of the time. With n_s = 5 a
    # normal quantile in place of the t quantile would pass it ≈ 13% of the time.
    delta, threshold, n_safety, trials = 0.1, 0.0, 5, 20_000
    costs = threshold + 0.01 + jax.random.normal(jax.random.PRNGKey(0), (trials, n_safety))
    passed, _ = jax.jit(
        jax.vmap(lambda c: hc_rlhf.safety_test(c, threshold=threshold, delta=delta))
    )(costs)
    frequency = float(jnp.mean(passed))
    assert frequency <= _allowance(delta, trials)
    assert frequency > 0.05  # the threshold is close: the test is not vacuous
    verdicts = {hc_rlhf.safety_verdict(p) for p in passed[:50]}
    assert verdicts == {hc_rlhf.PASS, hc_rlhf.NO_SOLUTION_FOUND}


@functools.partial(jax.jit, static_argnames="trials")
def _bandit_runs(key, safety_coef, *, trials):
    """HC-RLHF on a 3-armed bandit with normal costs, ``trials`` independent runs.

    Candidate selection keeps the best-reward arm whose pessimistic bound on candidate
    data is below the threshold (else the arm with the lowest bound); the safety test
    then runs on fresh held-out data of the chosen arm.
    """
    delta, threshold, n_candidate, n_safety = 0.1, 0.0, 40, 40
    cost_means = jnp.array([-0.6, 0.02, 1.0])  # arm 1 is unsafe by a hair
    reward_means = jnp.array([0.0, 1.0, 2.0])

    def trial(key):
        key_c, key_s = jax.random.split(key)
        candidate = cost_means[:, None] + jax.random.normal(key_c, (3, n_candidate))
        bounds = jax.vmap(
            lambda c: hc_rlhf.pessimistic_cost_bound(
                c, delta=delta, safety_size=n_safety, safety_coef=safety_coef
            )
        )(candidate)
        feasible = bounds <= threshold
        chosen = jnp.where(
            jnp.any(feasible),
            jnp.argmax(jnp.where(feasible, reward_means, -jnp.inf)),
            jnp.argmin(bounds),
        )
        held_out = cost_means[chosen] + jax.random.normal(key_s, (n_safety,))
        passed, _ = hc_rlhf.safety_test(held_out, threshold=threshold, delta=delta)
        return passed, chosen, cost_means[chosen] > threshold

    return jax.vmap(trial)(jax.random.split(key, trials))


def test_hc_rlhf_bandit_returns_unsafe_policy_at_most_delta_of_the_time():
    delta, trials = 0.1, 2000
    # The paper's pessimistic selection (κ_s = 2) rarely proposes the unsafe arm; a naive
    # selection on the plain candidate mean (κ_s = 0) proposes it about half the time.
    # Either way the safety test must keep unsafe returns at or below δ.
    for safety_coef, min_unsafe_proposals in ((2.0, 0), (0.0, 0.3 * trials)):
        passed, chosen, unsafe = _bandit_runs(jax.random.PRNGKey(1), safety_coef, trials=trials)
        assert float(jnp.mean(passed & unsafe)) <= _allowance(delta, trials)
        assert int(jnp.sum(unsafe)) >= min_unsafe_proposals
    # Not vacuous: with the pessimistic selection the safe arm is returned most of the time.
    passed, chosen, _ = _bandit_runs(jax.random.PRNGKey(1), 2.0, trials=trials)
    assert float(jnp.mean(passed & (chosen == 0))) > 0.5
