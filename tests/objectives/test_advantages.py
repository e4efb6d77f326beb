import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.objectives import advantages as adv


def _numpy_gae(rewards, values, mask, gamma, lam):
    """Plain loops over the valid positions of each row, terminal after the last one."""
    out = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = np.nonzero(mask[b])[0]
        next_value, next_adv = 0.0, 0.0
        for t in idx[::-1]:
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b, t]
            out[b, t] = next_adv
    return out


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    B, T = 4, 7
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    values = rng.normal(size=(B, T)).astype(np.float32)
    mask = np.ones((B, T), np.float32)
    mask[0, 5:] = 0  # right padding
    mask[1, :2] = 0  # left padding
    mask[2, [1, 4]] = 0  # holes
    mask[3, :] = 0  # an empty row
    mask[3, 3] = 1
    return rewards, values, mask


gae = jax.jit(adv.gae_advantages, static_argnames=("gamma", "lam"))


def test_gae_matches_a_numpy_reference_with_masks(batch):
    rewards, values, mask = batch
    for gamma, lam in ((0.9, 0.8), (1.0, 0.95)):
        advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
        np.testing.assert_allclose(
            advantages, _numpy_gae(rewards, values, mask, gamma, lam), atol=1e-5
        )
        np.testing.assert_allclose(returns, (advantages + values) * mask, atol=1e-6)


def test_gae_lambda_one_is_monte_carlo_return_minus_value(batch):
    rewards, values, mask = batch
    gamma = 0.9
    advantages, _ = gae(rewards, values, mask, gamma=gamma, lam=1.0)
    for b in range(rewards.shape[0]):
        idx = np.nonzero(mask[b])[0]
        for i, t in enumerate(idx):
            future = rewards[b, idx[i:]]
            ret = np.sum(future * gamma ** np.arange(len(future)))
            np.testing.assert_allclose(advantages[b, t], ret - values[b, t], atol=1e-5)


def test_gae_lambda_zero_is_the_td_error(batch):
    rewards, values, mask = batch
    gamma = 0.8
    advantages, _ = gae(rewards, values, mask, gamma=gamma, lam=0.0)
    for b in range(rewards.shape[0]):
        idx = list(np.nonzero(mask[b])[0])
        for i, t in enumerate(idx):
            next_value = values[b, idx[i + 1]] if i + 1 < len(idx) else 0.0
            td = rewards[b, t] + gamma * next_value - values[b, t]
            np.testing.assert_allclose(advantages[b, t], td, atol=1e-6)


def test_gae_ignores_masked_positions_and_supports_sparse_rewards(batch):
    rewards, values, mask = batch
    garbage = np.where(mask > 0, 0.0, 1e3).astype(np.float32)
    a1, _ = gae(rewards, values, mask, gamma=0.9, lam=0.9)
    a2, _ = gae(rewards + garbage, values - garbage, mask, gamma=0.9, lam=0.9)
    np.testing.assert_allclose(a1, a2, atol=1e-5)
    assert float(jnp.max(jnp.abs(a1 * (1 - mask)))) == 0.0
    # A sparse reward on the last token with zero values: advantage γ^(steps to end)·R.
    sparse = np.zeros((1, 4), np.float32)
    sparse[0, 3] = 2.0
    a, _ = gae(sparse, np.zeros_like(sparse), np.ones_like(sparse), gamma=0.5, lam=1.0)
    np.testing.assert_allclose(a[0], 2.0 * 0.5 ** np.arange(3, -1, -1), atol=1e-6)


def test_rloo_baseline_excludes_the_own_sample():
    rewards = jax.random.normal(jax.random.PRNGKey(0), (3, 5))
    a = adv.rloo_advantages(rewards)
    for p in range(3):
        for i in range(5):
            others = np.delete(np.asarray(rewards[p]), i)
            np.testing.assert_allclose(a[p, i], rewards[p, i] - others.mean(), atol=1e-6)
    # The baseline does not depend on the sample's own reward.
    bumped = rewards.at[0, 0].add(10.0)
    np.testing.assert_allclose(adv.rloo_advantages(bumped)[0, 0] - a[0, 0], 10.0, atol=1e-5)
    with pytest.raises(ValueError, match="group size"):
        adv.rloo_advantages(rewards[:, :1])


def test_grpo_groups_have_zero_mean_and_unit_std():
    rewards = jax.random.normal(jax.random.PRNGKey(1), (4, 8)) * 3.0 + 1.0
    a = adv.grpo_advantages(rewards, epsilon=0.0)
    np.testing.assert_allclose(jnp.mean(a, axis=1), 0.0, atol=1e-6)
    np.testing.assert_allclose(jnp.std(a, axis=1), 1.0, atol=1e-5)
    # A constant group gives zero advantages, not NaN.
    flat = adv.grpo_advantages(jnp.ones((1, 4)))
    assert float(jnp.max(jnp.abs(flat))) == 0.0
    centred = adv.grpo_advantages(rewards, scale=False)
    np.testing.assert_allclose(centred, rewards - rewards.mean(axis=1, keepdims=True), atol=1e-6)
    # vmaps over an extra leading axis.
    stacked = jax.vmap(adv.grpo_advantages)(jnp.stack([rewards, 2 * rewards]))
    np.testing.assert_allclose(stacked[1], adv.grpo_advantages(2 * rewards), atol=1e-6)


def test_gae_vmaps_over_stacked_batches(batch):
    rewards, values, mask = batch
    stacked = jax.vmap(lambda r, v, m: adv.gae_advantages(r, v, m, gamma=0.9, lam=0.7)[0])(
        jnp.stack([rewards, 2 * rewards]), jnp.stack([values, values]), jnp.stack([mask, mask])
    )
    np.testing.assert_allclose(
        stacked[1], gae(2 * rewards, values, mask, gamma=0.9, lam=0.7)[0], atol=1e-5
    )
