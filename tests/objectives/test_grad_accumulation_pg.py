import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.objectives import ppo


@pytest.fixture(scope="module")
def batch():
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    B, T = 8, 5
    old_logp = -jnp.abs(jax.random.normal(keys[0], (B, T)))
    logp = old_logp + 0.3 * jax.random.normal(keys[1], (B, T))  # some ratios clipped
    advantages = jax.random.normal(keys[2], (B, T))
    lengths = jnp.array([5, 1, 3, 4, 2, 5, 0, 3])  # ragged, one empty sequence
    mask = (jnp.arange(T)[None, :] < lengths[:, None]).astype(jnp.float32)
    return logp, old_logp, advantages, mask


@pytest.mark.parametrize("normalisation", ["token", "sequence"])
def test_eight_batches_of_one_accumulate_to_one_batch_of_eight(batch, normalisation):
    logp, old_logp, advantages, mask = batch

    def loss(lp, old, adv, m, reduction):
        return ppo.ppo_policy_loss(
            lp, old, adv, m, clip_eps=0.2, normalisation=normalisation, reduction=reduction
        )

    value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnames="reduction")
    (full, metrics), full_grad = value_and_grad(logp, old_logp, advantages, mask, "mean")
    total, grads, denominator = 0.0, [], 0.0
    for i in range(8):
        sl = slice(i, i + 1)
        (part, part_metrics), part_grad = value_and_grad(
            logp[sl], old_logp[sl], advantages[sl], mask[sl], "sum"
        )
        total += part
        grads.append(part_grad)
        denominator += part_metrics["denominator"]
    np.testing.assert_allclose(denominator, metrics["denominator"])
    # Float32 sums in a different order: agreement to ~1e-6 relative.
    np.testing.assert_allclose(total / metrics["denominator"], full, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        jnp.concatenate(grads) / metrics["denominator"], full_grad, rtol=1e-5, atol=1e-7
    )
