"""Multi-objective DPO (MODPO): DPO for a weighted combination of rewards.

One reward is learned from the preference data; the others are given as trained reward
models and enter the loss as a margin.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import Array

from rlhf_jax.objectives.reduction import Reduction, reduce_loss


def modpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    chosen_margin_rewards: Array,
    rejected_margin_rewards: Array,
    *,
    margin_weights: Array,
    preference_weight: float,
    beta: float = 0.1,
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """MODPO loss for the objective ``w·r`` with the preference-data reward weighted ``w_k``.

    ``L = −log σ((β/w_k) h − (1/w_k) Σ_m w_m (r_m(y_w) − r_m(y_l)))`` with h the DPO
    log-ratio difference (Zhou et al., 2023, "Beyond One-Preference-Fits-All Alignment:
    Multi-Objective Direct Preference Optimization"). When the labels follow
    Bradley–Terry on ``r_k``, the population optimum is
    ``π* ∝ π_ref exp((w_k r_k + Σ_m w_m r_m)/β)``.

    Args:
      policy_chosen_logps: ``[B]`` log π(y_w|x).
      policy_rejected_logps: ``[B]`` log π(y_l|x).
      ref_chosen_logps: ``[B]`` log π_ref(y_w|x).
      ref_rejected_logps: ``[B]`` log π_ref(y_l|x).
      chosen_margin_rewards: ``[B, M]`` rewards r_m(x, y_w) of the M given reward models.
      rejected_margin_rewards: ``[B, M]`` rewards r_m(x, y_l).
      margin_weights: ``[M]`` weights w_m of the given reward models.
      preference_weight: w_k > 0, the weight of the reward the preferences express.
      beta: β.
      reduction: ``"mean"`` or ``"sum"`` over pairs.

    Returns:
      ``(loss, metrics)`` with ``"denominator"``, ``"reward_margin"`` (mean of the
      implicit ``w_k``-reward margin, the sigmoid's argument) and ``"reward_accuracy"``.
    """
    logps = [policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps]
    chex.assert_rank(logps, 1)
    chex.assert_equal_shape(logps)
    chex.assert_rank([chosen_margin_rewards, rejected_margin_rewards], 2)
    chex.assert_equal_shape([chosen_margin_rewards, rejected_margin_rewards])
    chex.assert_equal_shape_prefix([policy_chosen_logps, chosen_margin_rewards], 1)
    chex.assert_shape(margin_weights, (chosen_margin_rewards.shape[1],))
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    margin = (chosen_margin_rewards - rejected_margin_rewards) @ margin_weights
    logits = (beta * h - margin) / preference_weight
    per_pair = -jax.nn.log_sigmoid(logits)
    loss, denominator = reduce_loss(per_pair, reduction=reduction)
    logits = jax.lax.stop_gradient(logits)
    return loss, {
        "denominator": denominator,
        "reward_margin": jnp.mean(logits),
        "reward_accuracy": jnp.mean((logits > 0).astype(logits.dtype)),
    }
