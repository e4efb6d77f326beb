"""Advantage estimators: GAE over token sequences and group baselines (RLOO, GRPO).

GAE (Schulman et al., 2016, "High-Dimensional Continuous Control Using Generalized
Advantage Estimation", eq. 16): with the TD error ``δ_t = r_t + γ V(s_{t+1}) − V(s_t)``,
``Â_t = Σ_{l≥0} (γλ)^l δ_{t+l}``, computed by the backward recursion
``Â_t = δ_t + γλ Â_{t+1}``. λ = 0 gives the TD error, λ = 1 the discounted Monte Carlo
return minus the value.

Group baselines for ``G`` samples per prompt, rewards ``[num_prompts, G]``:
RLOO (Ahmadian et al., 2024, "Back to Basics", §3.2), ``A_i = r_i − (1/(G−1)) Σ_{j≠i} r_j``;
GRPO (Shao et al., 2024, "DeepSeekMath", §4.1.2), ``A_i = (r_i − mean(r)) / std(r)``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import Array


def gae_advantages(
    rewards: Array,
    values: Array,
    mask: Array,
    *,
    gamma: float,
    lam: float,
) -> tuple[Array, Array]:
    """Generalised advantage estimates and value targets over ``[B, T]`` token sequences.

    ``Â_t = δ_t + γλ Â_{t'}`` with ``δ_t = r_t + γ V_{t'} − V_t``, where ``t'`` is the next
    position with ``mask = 1`` (Schulman et al., 2016, eq. 16). Masked positions are
    transparent: they neither contribute rewards nor values, and their outputs are 0. The
    episode ends after the last unmasked position (``V = 0`` beyond it). Rewards may be
    dense (one per token, e.g. a KL penalty) or sparse (a score on the last token).

    Args:
      rewards: ``[B, T]`` per-token rewards.
      values: ``[B, T]`` value estimates ``V(s_t)`` (treated as constants).
      mask: ``[B, T]`` 1 on response tokens, 0 on padding.
      gamma: discount γ.
      lam: GAE parameter λ.

    Returns:
      ``(advantages, returns)``, both ``[B, T]``, with ``returns = advantages + values`` on
      unmasked positions (the value-function targets) and 0 elsewhere.
    """
    chex.assert_rank(rewards, 2)
    chex.assert_equal_shape([rewards, values, mask])
    rewards = jax.lax.stop_gradient(rewards)
    values = jax.lax.stop_gradient(values)
    valid = mask > 0

    def step(carry: tuple[Array, Array], inputs: tuple[Array, Array, Array]) -> tuple:
        next_value, next_advantage = carry
        reward, value, is_valid = inputs
        delta = reward + gamma * next_value - value
        advantage = delta + gamma * lam * next_advantage
        carry = (
            jnp.where(is_valid, value, next_value),
            jnp.where(is_valid, advantage, next_advantage),
        )
        return carry, jnp.where(is_valid, advantage, 0.0)

    zeros = jnp.zeros(rewards.shape[0], rewards.dtype)
    _, advantages = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, valid.T), reverse=True)
    advantages = advantages.T
    returns = jnp.where(valid, advantages + values, 0.0)
    return advantages, returns


def rloo_advantages(rewards: Array) -> Array:
    """REINFORCE leave-one-out advantages (Ahmadian et al., 2024, §3.2).

    ``A_i = r_i − (1/(G−1)) Σ_{j≠i} r_j = G/(G−1) · (r_i − mean_j r_j)``: each sample's
    baseline is the mean reward of the other samples for the same prompt, so it is
    independent of the sample and the estimator stays unbiased.

    Args:
      rewards: ``[num_prompts, G]`` sequence rewards, ``G ≥ 2``.

    Returns:
      ``[num_prompts, G]`` advantages.
    """
    chex.assert_rank(rewards, 2)
    group_size = rewards.shape[1]
    if group_size < 2:
        raise ValueError(f"RLOO needs a group size of at least 2, got rewards {rewards.shape}")
    others_mean = (jnp.sum(rewards, axis=1, keepdims=True) - rewards) / (group_size - 1)
    return rewards - others_mean


def grpo_advantages(rewards: Array, *, epsilon: float = 1e-6, scale: bool = True) -> Array:
    """Group-relative advantages (Shao et al., 2024, §4.1.2, outcome supervision).

    ``A_i = (r_i − mean(r)) / (std(r) + ε)`` within each prompt's group; ``scale=False``
    keeps only the centring (the variant of Liu et al., 2025, "Dr. GRPO"). The standard
    deviation is the population one (divide by ``G``), so each group has zero mean and
    unit standard deviation up to ε; some implementations (e.g. TRL) use the unbiased
    ``G − 1`` form, which rescales all advantages by ``sqrt((G−1)/G)``.

    Args:
      rewards: ``[num_prompts, G]`` sequence rewards.
      epsilon: ε guarding groups whose rewards are all equal.
      scale: divide by the group standard deviation.

    Returns:
      ``[num_prompts, G]`` advantages.
    """
    chex.assert_rank(rewards, 2)
    centred = rewards - jnp.mean(rewards, axis=1, keepdims=True)
    if not scale:
        return centred
    return centred / (jnp.std(rewards, axis=1, keepdims=True) + epsilon)
