"""Safe RLHF: reward-minus-cost advantages and Lagrange multiplier updates, as pure functions.

Dai et al. (2023), "Safe RLHF: Safe Reinforcement Learning from Human Feedback", §3.3.
The constrained problem ``max_θ J_R(θ)  s.t.  J_C(θ) ≤ d`` (``J_C`` the expected cost,
``d`` the threshold; the paper folds ``d`` into the cost) becomes the Lagrangian
``min_θ max_{λ≥0} [−J_R(θ) + λ (J_C(θ) − d)]``. The policy ascends the combined
advantage ``(A_r − λ A_c) / (1 + λ)`` (the ``1 + λ`` keeps its scale bounded as λ grows;
it rescales the step without moving the stationary point), and the multiplier follows
projected gradient ascent on the Lagrangian, either directly
``λ ← max(0, λ + α (J_C − d))`` or in log space ``ln λ ← ln λ + α λ (J_C − d)``
(Appendix, eq. 31), which keeps λ > 0 and makes its steps proportional to its size.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp
from jax import Array


def lagrangian_reward(reward: Array, cost: Array, multiplier: Array) -> Array:
    """``r − λ c``, the per-sample reward of the Lagrangian (Dai et al., 2023, §3.3)."""
    chex.assert_equal_shape([reward, cost])
    return reward - multiplier * cost


def safe_rlhf_advantages(
    reward_advantages: Array,
    cost_advantages: Array,
    multiplier: Array,
    *,
    normalise: bool = True,
) -> Array:
    """Combined advantage ``(A_r − λ A_c) / (1 + λ)`` (Dai et al., 2023, §3.3 and Appendix).

    Args:
      reward_advantages: advantages of the reward (any shape, e.g. ``[B, T]``).
      cost_advantages: advantages of the cost, same shape.
      multiplier: λ ≥ 0 (scalar).
      normalise: divide by ``1 + λ`` as in the paper; False gives the plain ``A_r − λ A_c``.

    Returns:
      The combined advantages, same shape as the inputs.
    """
    chex.assert_equal_shape([reward_advantages, cost_advantages])
    chex.assert_rank(multiplier, 0)
    combined = reward_advantages - multiplier * cost_advantages
    return combined / (1.0 + multiplier) if normalise else combined


def lagrange_multiplier_update(
    multiplier: Array, expected_cost: Array, *, threshold: float, learning_rate: float
) -> Array:
    """Projected dual ascent ``λ ← max(0, λ + α (J_C − d))``.

    Args:
      multiplier: λ ≥ 0 (scalar).
      expected_cost: J_C, the mean cost of the current policy (scalar).
      threshold: d.
      learning_rate: α.

    Returns:
      The new λ.
    """
    chex.assert_rank([multiplier, expected_cost], 0)
    return jnp.maximum(multiplier + learning_rate * (expected_cost - threshold), 0.0)


def log_lagrange_multiplier_update(
    log_multiplier: Array, expected_cost: Array, *, threshold: float, learning_rate: float
) -> Array:
    """Log-parameterised dual ascent ``ln λ ← ln λ + α λ (J_C − d)``.

    Dai et al. (2023), Appendix, eq. 31.

    This is gradient ascent on ``λ (J_C − d)`` with respect to ``ln λ``; λ stays positive
    and tends to 0 (``ln λ → −∞``) when the constraint is slack.

    Args:
      log_multiplier: ln λ (scalar).
      expected_cost: J_C (scalar).
      threshold: d.
      learning_rate: α.

    Returns:
      The new ln λ.
    """
    chex.assert_rank([log_multiplier, expected_cost], 0)
    return log_multiplier + learning_rate * jnp.exp(log_multiplier) * (expected_cost - threshold)
