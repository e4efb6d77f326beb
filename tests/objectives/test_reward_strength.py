import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.objectives import reward_model, reward_strength
from rlhf_jax.tabular import preference_optima as po

# float32 arithmetic on O(1) values: a handful of ulps (~1e-7 each) of slack.
RTOL = 1e-5


def _logistic(z):
    return np.log1p(np.exp(-np.asarray(z, np.float64)))


def test_preference_strength_is_the_ensemble_mean_and_population_std():
    rng = np.random.default_rng(0)
    chosen, rejected = rng.normal(size=(2, 5, 7)).astype(np.float32)
    mean, std = reward_strength.preference_strength(jnp.asarray(chosen), jnp.asarray(rejected))
    d = chosen.astype(np.float64) - rejected
    np.testing.assert_allclose(mean, d.sum(0) / 5, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(std, np.sqrt(((d - d.mean(0)) ** 2).sum(0) / 5), rtol=RTOL)


def test_flipping_a_mislabelled_pair_gives_the_loss_of_the_correct_label():
    # Pairs 0 and 2 are mislabelled (negative strength); the ensemble knows it.
    chosen = jnp.array([-1.0, 0.7, 0.2, 1.5])
    rejected = jnp.array([0.5, -0.3, 1.4, 0.1])
    strength = jnp.array([-0.8, 0.9, -1.1, 1.2])
    c, r, s, flipped = reward_strength.flip_labels(chosen, rejected, strength)
    np.testing.assert_array_equal(flipped, [True, False, True, False])
    # The correctly labelled pairs, written by hand.
    true_c = jnp.array([0.5, 0.7, 1.4, 1.5])
    true_r = jnp.array([-1.0, -0.3, 0.2, 0.1])
    true_s = jnp.array([0.8, 0.9, 1.1, 1.2])
    np.testing.assert_array_equal(s, true_s)
    flipped_loss, _ = reward_strength.strength_reward_loss(
        c, r, margin=reward_strength.adaptive_margin(s)
    )
    correct_loss, _ = reward_strength.strength_reward_loss(
        true_c, true_r, margin=reward_strength.adaptive_margin(true_s)
    )
    np.testing.assert_array_equal(flipped_loss, correct_loss)


def test_soft_labels_and_margin_match_the_direct_formula():
    strength = jnp.array([-0.5, 0.0, 0.3, 2.0])
    p = reward_strength.soft_labels(strength, threshold=0.25, smoothing=0.2)
    np.testing.assert_allclose(p, [0.8, 0.8, 1.0, 1.0])
    margin = reward_strength.adaptive_margin(strength, scale=0.5)
    np.testing.assert_allclose(margin, [-0.25, 0.0, 0.15, 1.0])
    chosen = jnp.array([0.3, -0.2, 1.0, 0.4])
    rejected = jnp.array([0.1, 0.6, -0.5, 0.0])
    loss, metrics = reward_strength.strength_reward_loss(
        chosen, rejected, label_probs=p, margin=margin, reduction="sum"
    )
    d = np.asarray(chosen - rejected, np.float64)
    pn, mn = np.asarray(p, np.float64), np.asarray(margin, np.float64)
    expected = pn * _logistic(d - mn) + (1 - pn) * _logistic(-d - mn)
    np.testing.assert_allclose(loss, expected.sum(), rtol=RTOL)
    np.testing.assert_allclose(metrics["denominator"], 4.0)
    np.testing.assert_allclose(metrics["accuracy"], 0.75)


def test_scalar_soft_label_and_margin_reduce_to_the_smoothed_bradley_terry_loss():
    key1, key2 = jax.random.split(jax.random.PRNGKey(3))
    chosen, rejected = jax.random.normal(key1, (9,)), jax.random.normal(key2, (9,))
    ours, _ = reward_strength.strength_reward_loss(chosen, rejected, label_probs=0.9, margin=0.4)
    reference, _ = reward_model.bradley_terry_loss(
        chosen, rejected, margin=0.4, label_smoothing=0.1
    )
    np.testing.assert_allclose(ours, reference, rtol=RTOL)


def test_adaptive_margin_separates_strong_pairs_further_at_the_optimum():
    # Soft labels keep the optimum finite. The closed-form minimiser of
    # p ℓ(d − m) + (1 − p) ℓ(−d − m) (tabular.preference_optima, written independently)
    # must be a stationary point of our loss, and it grows with the margin m = û.
    p = jnp.full(3, 0.8)
    strength = jnp.array([0.0, 0.5, 1.5])
    margin = reward_strength.adaptive_margin(strength)
    d_star = po.bradley_terry_optimal_difference(p, margin)

    def total(d):
        return reward_strength.strength_reward_loss(
            d, jnp.zeros_like(d), label_probs=p, margin=margin, reduction="sum"
        )[0]

    # Per-pair curvature p(1 − p)-ish ≈ 0.16, so a zero gradient to 1e-6 pins d* to ~1e-5.
    np.testing.assert_allclose(jax.grad(total)(d_star), 0.0, atol=1e-6)
    np.testing.assert_allclose(d_star[0], np.log(0.8 / 0.2), rtol=1e-6)
    assert bool(jnp.all(jnp.diff(d_star) > 0))


def test_info_nce_matches_a_direct_computation_and_is_scale_invariant():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 6, 4)).astype(np.float32)
    tau = 0.3
    loss, metrics = jax.jit(reward_strength.info_nce_loss, static_argnames="temperature")(
        jnp.asarray(a), jnp.asarray(b), temperature=tau
    )
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    logits = (an @ bn.T).astype(np.float64) / tau
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(loss, -np.mean(np.diag(log_softmax)), rtol=RTOL)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(logits.argmax(1) == np.arange(6)))
    scaled, _ = reward_strength.info_nce_loss(
        jnp.asarray(3.0 * a), jnp.asarray(0.5 * b), temperature=tau
    )
    np.testing.assert_allclose(scaled, loss, rtol=RTOL)


def test_preference_contrastive_loss_uses_difference_representations():
    rng = np.random.default_rng(2)
    hc, hr, hc2, hr2 = (jnp.asarray(x) for x in rng.normal(size=(4, 5, 3)).astype(np.float32))
    loss, _ = reward_strength.preference_contrastive_loss(hc, hr, hc2, hr2, temperature=0.1)
    direct, _ = reward_strength.info_nce_loss(hc - hr, hc2 - hr2, temperature=0.1)
    np.testing.assert_array_equal(loss, direct)
    # Identical views of orthogonal differences: each positive is the unique match, and
    # as τ → 0 the loss tends to 0 (here exp(−1/0.01) ≈ 4e-44 per negative).
    eye = jnp.eye(3)
    zero = jnp.zeros((3, 3))
    sharp, metrics = reward_strength.preference_contrastive_loss(
        eye, zero, eye, zero, temperature=0.01
    )
    assert float(sharp) < 1e-6
    np.testing.assert_allclose(metrics["accuracy"], 1.0)


def test_strength_pipeline_jits_and_vmaps_over_groups():
    # Ensemble [M=3, B=4] scores, in 2 groups; the vmapped loss equals per-group calls.
    rng = np.random.default_rng(4)
    chosen, rejected = (jnp.asarray(x) for x in rng.normal(size=(2, 2, 3, 4)).astype(np.float32))

    @jax.jit
    def pipeline(chosen, rejected):
        mean, _ = reward_strength.preference_strength(chosen, rejected)
        c, r, s, _ = reward_strength.flip_labels(chosen[0], rejected[0], mean)
        return reward_strength.strength_reward_loss(
            c, r, label_probs=reward_strength.soft_labels(s, threshold=0.5), margin=s
        )[0]

    grouped = jax.vmap(pipeline)(chosen, rejected)
    np.testing.assert_allclose(
        grouped, [pipeline(chosen[0], rejected[0]), pipeline(chosen[1], rejected[1])], rtol=1e-6
    )
