import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.objectives import ppo


@pytest.fixture(scope="module")
def batch():
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    B, T = 3, 6
    old_logp = -jnp.abs(jax.random.normal(keys[0], (B, T)))
    advantages = jax.random.normal(keys[1], (B, T))
    mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]], jnp.float32)
    return old_logp, advantages, mask


policy_loss = jax.jit(
    ppo.ppo_policy_loss, static_argnames=("clip_eps", "clip_eps_high", "normalisation", "reduction")
)


def test_equals_the_unclipped_surrogate_inside_the_clip_range(batch):
    old_logp, advantages, mask = batch
    # Ratios within (0.9, 1.1) ⊂ (1 − ε, 1 + ε) for ε = 0.2.
    delta = 0.09 * jnp.sin(jnp.arange(18.0)).reshape(3, 6)
    logp = old_logp + delta

    def unclipped(lp):
        per_token = -jnp.exp(lp - old_logp) * advantages
        return jnp.sum(per_token * mask) / jnp.sum(mask)

    loss, metrics = policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2)
    np.testing.assert_allclose(loss, unclipped(logp), rtol=1e-6)
    grad = jax.grad(lambda lp: policy_loss(lp, old_logp, advantages, mask, clip_eps=0.2)[0])
    np.testing.assert_allclose(grad(logp), jax.grad(unclipped)(logp), atol=1e-7)
    assert float(metrics["clip_fraction"]) == 0.0
    # At ρ = 1 the gradient is the vanilla policy gradient −A·m/Σm.
    np.testing.assert_allclose(grad(old_logp), -advantages * mask / jnp.sum(mask), atol=1e-7)


def test_zero_gradient_when_the_ratio_is_pushed_past_the_clip(batch):
    old_logp, _, mask = batch
    eps = 0.2
    advantages = jnp.array([[1.0] * 6, [-1.0] * 6, [1.0, -1.0] * 3])
    # Positive advantage with ρ > 1 + ε, negative advantage with ρ < 1 − ε: clipped, flat.
    shift = jnp.where(advantages > 0, jnp.log(1.5), jnp.log(0.5))
    logp = old_logp + shift
    grad = jax.grad(lambda lp: policy_loss(lp, old_logp, advantages, mask, clip_eps=eps)[0])(logp)
    assert float(jnp.max(jnp.abs(grad))) == 0.0
    loss, metrics = policy_loss(logp, old_logp, advantages, mask, clip_eps=eps)
    np.testing.assert_allclose(
        loss,
        -jnp.sum(jnp.where(advantages > 0, 1.2, 0.8) * advantages * mask) / jnp.sum(mask),
        rtol=1e-6,
    )
    np.testing.assert_allclose(metrics["clip_fraction"], 1.0)
    # Moving past the clip against the advantage is not clipped: gradient stays −ρA.
    logp_against = old_logp - shift
    grad_against = jax.grad(
        lambda lp: policy_loss(lp, old_logp, advantages, mask, clip_eps=eps)[0]
    )(logp_against)
    expected = -jnp.exp(logp_against - old_logp) * advantages * mask / jnp.sum(mask)
    np.testing.assert_allclose(grad_against, expected, atol=1e-7)


def test_asymmetric_clip_high(batch):
    old_logp, _, mask = batch
    advantages = jnp.ones_like(old_logp)
    logp = old_logp + jnp.log(1.25)
    loss_sym, _ = policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2)
    loss_high, _ = policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2, clip_eps_high=0.28)
    np.testing.assert_allclose(loss_sym, -1.2, rtol=1e-6)
    np.testing.assert_allclose(loss_high, -1.25, rtol=1e-6)


def test_value_clipping(batch):
    _, _, mask = batch
    old_values = jnp.zeros((3, 6))
    returns = jnp.ones((3, 6))
    value_loss = jax.jit(
        ppo.ppo_value_loss, static_argnames=("clip_eps", "normalisation", "reduction")
    )
    # Moving towards the target beyond ε: the clipped value (0.2) is farther, so the max
    # picks it; loss ½(1 − 0.2)² and no gradient.
    values = jnp.full((3, 6), 0.5)
    loss, metrics = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    np.testing.assert_allclose(loss, 0.5 * 0.8**2, rtol=1e-6)
    np.testing.assert_allclose(metrics["value_clip_fraction"], 1.0)
    grad = jax.grad(lambda v: value_loss(v, old_values, returns, mask, clip_eps=0.2)[0])(values)
    assert float(jnp.max(jnp.abs(grad))) == 0.0
    # Within ε: the plain squared error and its gradient (v − R)·m/Σm.
    values = jnp.full((3, 6), 0.1)
    loss, _ = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    np.testing.assert_allclose(loss, 0.5 * 0.9**2, rtol=1e-6)
    grad = jax.grad(lambda v: value_loss(v, old_values, returns, mask, clip_eps=0.2)[0])(values)
    np.testing.assert_allclose(grad, (values - returns) * mask / jnp.sum(mask), atol=1e-7)
    # Moving away from the target beyond ε: the unclipped error is larger, still penalised.
    values = jnp.full((3, 6), -0.5)
    loss, _ = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    np.testing.assert_allclose(loss, 0.5 * 1.5**2, rtol=1e-6)
    loss_none, _ = value_loss(values, old_values, returns, mask, clip_eps=None)
    np.testing.assert_allclose(loss_none, 0.5 * 1.5**2, rtol=1e-6)


def test_entropy_and_combined_loss(batch):
    old_logp, advantages, mask = batch
    logits = jax.random.normal(jax.random.PRNGKey(5), (3, 6, 4))
    entropy = ppo.token_entropy(logits)
    uniform = ppo.token_entropy(jnp.zeros((1, 1, 4)))
    np.testing.assert_allclose(uniform, jnp.log(4.0), rtol=1e-6)
    ent_loss, _ = ppo.entropy_bonus_loss(logits, mask)
    np.testing.assert_allclose(ent_loss, -jnp.sum(entropy * mask) / jnp.sum(mask), rtol=1e-6)
    values = jnp.zeros((3, 6))
    returns = jnp.ones((3, 6))
    total, metrics = ppo.ppo_loss(
        old_logp,
        old_logp,
        advantages,
        values,
        values,
        returns,
        mask,
        logits=logits,
        value_coef=0.5,
        entropy_coef=0.01,
    )
    np.testing.assert_allclose(
        total, metrics["policy_loss"] + 0.5 * metrics["value_loss"] + 0.01 * ent_loss, rtol=1e-6
    )
    with pytest.raises(ValueError, match="logits"):
        ppo.ppo_loss(
            old_logp, old_logp, advantages, values, values, returns, mask, entropy_coef=0.1
        )


def test_sequence_normalisation_weights_sequences_equally(batch):
    old_logp, advantages, mask = batch
    loss, metrics = policy_loss(old_logp, old_logp, advantages, mask, normalisation="sequence")
    per_sequence = -jnp.sum(advantages * mask, axis=1) / jnp.sum(mask, axis=1)
    np.testing.assert_allclose(loss, jnp.mean(per_sequence), rtol=1e-6)
    np.testing.assert_allclose(metrics["denominator"], 3.0)


def test_vmaps_over_stacked_batches(batch):
    old_logp, advantages, mask = batch
    logp = old_logp + 0.3
    stacked = jax.vmap(lambda lp, o, a, m: ppo.ppo_policy_loss(lp, o, a, m)[0])(
        jnp.stack([logp, old_logp]),
        jnp.stack([old_logp, old_logp]),
        jnp.stack([advantages, -advantages]),
        jnp.stack([mask, mask]),
    )
    np.testing.assert_allclose(
        stacked[0], policy_loss(logp, old_logp, advantages, mask)[0], rtol=1e-6
    )
    np.testing.assert_allclose(
        stacked[1], policy_loss(old_logp, old_logp, -advantages, mask)[0], rtol=1e-6
    )
