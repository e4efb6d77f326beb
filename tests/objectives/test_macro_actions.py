"""Tests for MA-RLHF macro-action PPO: reduction to token PPO and a hand-computed case."""

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.objectives import macro_actions
from rlhf_jax.objectives.advantages import gae_advantages
from rlhf_jax.objectives.ppo import ppo_loss

# float32 sums of a handful of terms: agreement to 1e-5 relative is rounding only.
RTOL = 1e-5


def _batch(key, shape=(3, 7)):
    keys = jax.random.split(key, 6)
    logp = -jnp.abs(jax.random.normal(keys[0], shape))
    old_logp = logp + 0.3 * jax.random.normal(keys[1], shape)
    values = jax.random.normal(keys[2], shape)
    old_values = values + 0.3 * jax.random.normal(keys[3], shape)
    rewards = jax.random.normal(keys[4], shape)
    # Prompt positions at the start and padding at the end, different per row.
    positions = jnp.arange(shape[1])
    mask = (positions >= jnp.array([[0], [1], [2]])) & (positions < jnp.array([[7], [5], [6]]))
    return logp, old_logp, values, old_values, rewards, mask.astype(jnp.float32)


def test_fixed_length_and_boundary_indices():
    mask = jnp.array([[0, 1, 1, 1, 1, 1, 0]], jnp.float32)
    T = 7
    np.testing.assert_array_equal(
        macro_actions.fixed_length_macro_index(mask, 2), [[T, 0, 0, 1, 1, 2, T]]
    )
    starts = jnp.array([[0, 0, 0, 1, 0, 0, 1]])
    np.testing.assert_array_equal(
        macro_actions.boundary_macro_index(starts, mask), [[T, 0, 0, 1, 1, 1, T]]
    )


def test_macro_value_weightings():
    values = jnp.array([[9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 9.0]])
    index = macro_actions.fixed_length_macro_index(jnp.array([[0, 1, 1, 1, 1, 1, 0]]), 2)
    expected = {"first": [1.0, 3.0, 5.0], "mean": [1.5, 3.5, 5.0], "last": [2.0, 4.0, 5.0]}
    for weighting, want in expected.items():
        got = macro_actions.macro_value(values, index, weighting=weighting)
        np.testing.assert_array_equal(got, [want + [0.0] * 4])


def test_macro_size_one_equals_token_ppo():
    logp, old_logp, values, old_values, rewards, mask = _batch(jax.random.PRNGKey(0))
    index = macro_actions.fixed_length_macro_index(mask, 1)
    adv, ret = gae_advantages(rewards, old_values, mask, gamma=0.97, lam=0.9)
    macro_adv, macro_ret = macro_actions.macro_gae_advantages(
        rewards, old_values, index, gamma=0.97, lam=0.9
    )
    # Macro slots are compacted; mapped back to tokens they must be the token GAE.
    np.testing.assert_allclose(
        macro_actions.macro_to_tokens(macro_adv, index), adv, rtol=RTOL, atol=1e-6
    )
    np.testing.assert_allclose(
        macro_actions.macro_to_tokens(macro_ret, index), ret, rtol=RTOL, atol=1e-6
    )

    def token_loss(lp, v):
        return ppo_loss(lp, old_logp, adv, v, old_values, ret, mask)[0]

    def macro_loss(lp, v):
        return macro_actions.macro_ppo_loss(
            lp, old_logp, macro_adv, v, old_values, macro_ret, index
        )[0]

    want, want_grads = jax.jit(jax.value_and_grad(token_loss, argnums=(0, 1)))(logp, values)
    got, got_grads = jax.jit(jax.value_and_grad(macro_loss, argnums=(0, 1)))(logp, values)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=1e-7)


def test_macro_of_size_n_matches_hand_computation():
    logp, old_logp, values, old_values, rewards, _ = _batch(jax.random.PRNGKey(1), (1, 5))
    mask = jnp.ones((1, 5))
    gamma, lam, eps = 0.9, 0.8, 0.2
    index = macro_actions.fixed_length_macro_index(mask, 2)  # macros {0,1}, {2,3}, {4}
    macro_adv, macro_ret = macro_actions.macro_gae_advantages(
        rewards, old_values, index, gamma=gamma, lam=lam
    )
    loss, metrics = macro_actions.macro_ppo_loss(
        logp,
        old_logp,
        macro_adv,
        values,
        old_values,
        macro_ret,
        index,
        clip_eps=eps,
        value_clip_eps=None,
        value_coef=0.5,
    )
    r, v_old, v = (np.asarray(x[0], np.float64) for x in (rewards, old_values, values))
    lp, olp = np.asarray(logp[0], np.float64), np.asarray(old_logp[0], np.float64)
    groups = [[0, 1], [2, 3], [4]]
    R = np.array([r[g].sum() for g in groups])
    V = np.array([v_old[g[0]] for g in groups])
    V_next = np.append(V[1:], 0.0)
    delta = R + gamma * V_next - V
    A = np.zeros(3)
    running = 0.0
    for k in reversed(range(3)):
        running = delta[k] + gamma * lam * running
        A[k] = running
    returns = A + V
    ratio = np.exp([lp[g].sum() - olp[g].sum() for g in groups])
    policy = -np.minimum(ratio * A, np.clip(ratio, 1 - eps, 1 + eps) * A).mean()
    value = 0.5 * np.mean((np.array([v[g[0]] for g in groups]) - returns) ** 2)
    np.testing.assert_allclose(macro_adv[0, :3], A, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(macro_adv[0, 3:], 0.0)
    np.testing.assert_allclose(loss, policy + 0.5 * value, rtol=RTOL)
    assert float(metrics["macros"]) == 3.0
    # The released code's variant: per-token ratios with the macro's advantage, and each
    # token's value regressed on its macro's return, averaged over the 5 tokens.
    token_loss, _ = macro_actions.macro_ppo_loss(
        logp,
        old_logp,
        macro_adv,
        values,
        old_values,
        macro_ret,
        index,
        clip_eps=eps,
        value_clip_eps=None,
        value_coef=0.5,
        granularity="token",
    )
    owner = np.array([0, 0, 1, 1, 2])
    token_ratio = np.exp(lp - olp)
    token_policy = -np.minimum(
        token_ratio * A[owner], np.clip(token_ratio, 1 - eps, 1 + eps) * A[owner]
    ).mean()
    token_value = 0.5 * np.mean((v - returns[owner]) ** 2)
    np.testing.assert_allclose(token_loss, token_policy + 0.5 * token_value, rtol=RTOL)
