import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.objectives import pairwise, unpaired

# Parity checks compare float32 objectives with float64 numpy on O(1) values through a
# handful of ops: rtol 1e-5 (1e-6 where both sides are float32 and the same operations).


def logps(key, size):
    return -jnp.abs(jax.random.normal(key, (size,))) * 4 - 0.1


def test_kto_reference_point_is_the_clamped_detached_batch_kl():
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    policy_kl, ref_kl = logps(keys[0], 8), logps(keys[1], 8)
    z0 = unpaired.kto_reference_point(policy_kl, ref_kl)
    np.testing.assert_allclose(z0, max(0.0, float(np.mean(policy_kl - ref_kl))), rtol=1e-6)
    # Clamped at zero when the estimate is negative.
    assert float(unpaired.kto_reference_point(ref_kl - 1.0, ref_kl)) == 0.0
    # No gradient reaches the policy through the reference point.
    policy, ref = logps(keys[2], 6), logps(keys[3], 6)
    desirable = jnp.array([True, False, True, True, False, False])
    grad_kl = jax.grad(lambda kl: unpaired.kto_loss(policy, ref, desirable, kl, ref_kl - 1.0)[0])(
        ref_kl + 1.0
    )
    np.testing.assert_array_equal(grad_kl, 0.0)


def test_kto_loss_matches_the_value_function():
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    policy, ref = logps(keys[0], 6), logps(keys[1], 6)
    policy_kl, ref_kl = ref + 0.3, ref  # batch KL estimate 0.3
    desirable = jnp.array([True, False, True, True, False, False])
    beta, lam_d, lam_u = 0.5, 1.0, 1.5
    loss, metrics = jax.jit(unpaired.kto_loss)(
        policy,
        ref,
        desirable,
        policy_kl,
        ref_kl,
        beta=beta,
        desirable_weight=lam_d,
        undesirable_weight=lam_u,
    )
    r = np.asarray(policy - ref, np.float64)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    d = np.asarray(desirable)
    per = np.where(d, lam_d * (1 - sig(beta * (r - 0.3))), lam_u * (1 - sig(beta * (0.3 - r))))
    np.testing.assert_allclose(loss, per.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["reference_point"], 0.3, rtol=1e-5)
    # At the reference point the value is half the weight: L = λ/2.
    at_z0, _ = unpaired.kto_loss(
        jnp.array([0.3, 0.3]),
        jnp.zeros(2),
        jnp.array([True, False]),
        policy_kl,
        ref_kl,
        desirable_weight=lam_d,
        undesirable_weight=lam_u,
    )
    np.testing.assert_allclose(at_z0, (lam_d / 2 + lam_u / 2) / 2, rtol=1e-6)


def test_aot_unpaired_compares_quantiles():
    keys = jax.random.split(jax.random.PRNGKey(2), 4)
    pc, rc, pr, rr = (logps(k, 6) for k in keys)
    beta = 0.4
    loss, _ = jax.jit(unpaired.aot_unpaired_loss)(pc, rc, pr, rr, beta=beta)
    u, v = np.sort(np.asarray(pc - rc)), np.sort(np.asarray(pr - rr))
    np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-beta * (u - v)))), rtol=1e-5)
    # The chosen and rejected sets are unpaired: permuting one alone changes nothing.
    perm = jnp.array([2, 5, 0, 1, 3, 4])
    permuted, _ = unpaired.aot_unpaired_loss(pc, rc, pr[perm], rr[perm], beta=beta)
    np.testing.assert_allclose(permuted, loss, rtol=1e-6)
    # One chosen and one rejected response: the DPO loss of that pair.
    one = [a[:1] for a in (pc, pr, rc, rr)]
    np.testing.assert_allclose(
        unpaired.aot_unpaired_loss(one[0], one[2], one[1], one[3], beta=beta)[0],
        pairwise.dpo_loss(*one, beta=beta)[0],
        rtol=1e-6,
    )


def test_bco_unpaired_is_a_shifted_logistic_regression():
    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    policy, ref = logps(keys[0], 6), logps(keys[1], 6)
    desirable = jnp.array([True, False, True, True, False, False])
    beta, shift = 0.5, 0.2
    loss, metrics = jax.jit(unpaired.bco_unpaired_loss)(
        policy, ref, desirable, beta=beta, reward_shift=shift, shift_decay=0.9
    )
    z = beta * np.asarray(policy - ref, np.float64) - shift
    signed = np.where(np.asarray(desirable), z, -z)
    np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-signed))), rtol=1e-5)
    expected_shift = 0.9 * shift + 0.1 * beta * np.mean(np.asarray(policy - ref))
    np.testing.assert_allclose(metrics["reward_shift"], expected_shift, rtol=1e-5)
    # A pair (one desirable, one undesirable) gives the BCO pair loss / 2.
    pair, _ = unpaired.bco_unpaired_loss(
        jnp.stack([policy[0], policy[1]]),
        jnp.stack([ref[0], ref[1]]),
        jnp.array([True, False]),
        beta=beta,
        reward_shift=shift,
    )
    bco_pair, _ = pairwise.bco_pair_loss(
        policy[:1], policy[1:2], ref[:1], ref[1:2], beta=beta, reward_shift=shift
    )
    np.testing.assert_allclose(2 * pair, bco_pair, rtol=1e-6)


def test_unpaired_losses_vmap():
    keys = jax.random.split(jax.random.PRNGKey(4), 4)
    policy, ref, policy_kl, ref_kl = (logps(k, 6).reshape(2, 3) for k in keys)
    desirable = jnp.array([[True, False, True], [False, True, True]])
    grouped, metrics = jax.vmap(unpaired.kto_loss)(policy, ref, desirable, policy_kl, ref_kl)
    for g in range(2):
        single, _ = unpaired.kto_loss(policy[g], ref[g], desirable[g], policy_kl[g], ref_kl[g])
        np.testing.assert_allclose(grouped[g], single, rtol=1e-6)
    np.testing.assert_allclose(metrics["denominator"], [3.0, 3.0])
