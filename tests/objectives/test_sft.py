import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.objectives import sft

# Parity checks compare float32 objectives with float64 numpy on O(1) values through a
# handful of ops: rtol 1e-5 (1e-6 where both sides are float32 and the same operations).


@pytest.fixture(scope="module")
def batch():
    logps = -jnp.abs(jax.random.normal(jax.random.PRNGKey(0), (4, 6)))
    mask = jnp.array(
        [[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]],
        jnp.float32,
    )
    # Padded positions may hold anything, even -inf: they must not leak into the loss.
    return jnp.where(mask > 0, logps, -jnp.inf), mask


def test_token_normalisation_averages_over_all_target_tokens(batch):
    logps, mask = batch
    loss, metrics = jax.jit(sft.sft_loss)(logps, mask)
    m = np.asarray(mask, bool)
    np.testing.assert_allclose(loss, -np.asarray(logps)[m].mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["denominator"], m.sum())


def test_sequence_normalisation_averages_each_sequence_then_sequences(batch):
    logps, mask = batch
    loss, metrics = jax.jit(sft.sft_loss, static_argnames="normalisation")(
        logps, mask, normalisation="sequence"
    )
    m = np.asarray(mask, bool)
    per_sequence = [-np.asarray(logps)[b][m[b]].mean() for b in range(4) if m[b].any()]
    np.testing.assert_allclose(loss, np.mean(per_sequence), rtol=1e-6)
    # The empty sequence is not counted.
    np.testing.assert_allclose(metrics["denominator"], 3.0)
    grad = jax.grad(lambda x: sft.sft_loss(x, mask, normalisation="sequence")[0])(
        jnp.where(mask > 0, logps, 0.0)
    )
    np.testing.assert_allclose(grad[3, 2], -1.0 / 3.0, rtol=1e-6)
    assert bool(jnp.all(grad[mask == 0] == 0))


def test_sft_vmaps_over_groups(batch):
    logps, mask = batch
    grouped, _ = jax.vmap(sft.sft_loss)(logps.reshape(2, 2, 6), mask.reshape(2, 2, 6))
    for g in range(2):
        single, _ = sft.sft_loss(logps[2 * g : 2 * g + 2], mask[2 * g : 2 * g + 2])
        np.testing.assert_allclose(grouped[g], single, rtol=1e-6)


def test_unknown_normalisation_is_rejected(batch):
    with pytest.raises(ValueError, match="normalisation"):
        sft.sft_loss(*batch, normalisation="tokens")
