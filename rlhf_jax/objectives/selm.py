"""SELM: DPO with an optimism bias toward unexplored responses.

Self-Exploring Language Models (Zhang et al., 2024, "Self-Exploring Language Models: Active
Preference Elicitation for Online Alignment", §4) solve the inner problem of an
optimistically biased reward-fitting objective ``min_r L_BT(r) − α max_y r(x, y)`` with
the DPO reparameterisation and arrive at

    L_SELM = L_DPO(π; y_w ≻ y_l) + α β E_{x, y∼π_ref}[ log π(y|x) ],

whose extra term lowers the likelihood of responses the reference would produce, moving
mass toward responses the data has not covered (exploration); the paper's analysis (§5)
shows that, unlike DPO's indiscriminate favour of unseen extrapolations, this bias goes
to responses with high implicit reward. Per pair, with one reference response
``y_ref ∼ π_ref(·|x)``,

    ℓ_SELM = −log σ(β h) + α β log π(y_ref|x)/π_ref(y_ref|x),     h = a_w − a_l.

The authors' trainer (shenao-zhang/SELM, ``optimistic_dpo_loss``) adds the optimism term as
the log-ratio ``α β (log π − log π_ref)(y_ref)``, as here; the reference log-prob is a
constant, so the gradient is the paper's. With α = 0 the loss is DPO exactly.

Signature: the uniform pairwise signature of ``pairwise.py`` plus the policy and
reference log-probs of the reference-sampled responses.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import Array

from rlhf_jax.objectives.pairwise import dpo_loss
from rlhf_jax.objectives.reduction import Reduction, reduce_loss


def selm_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    policy_explore_logps: Array,
    ref_explore_logps: Array,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    reduction: Reduction = "mean",
    beta: float = 0.1,
    alpha: float = 0.001,
) -> tuple[Array, dict[str, Array]]:
    """SELM loss ``ℓ(β h) + α β log π(y_ref)/π_ref(y_ref)`` per pair (module docstring).

    Args:
      policy_chosen_logps: ``[B]`` log π(y_w|x).
      policy_rejected_logps: ``[B]`` log π(y_l|x).
      ref_chosen_logps: ``[B]`` log π_ref(y_w|x).
      ref_rejected_logps: ``[B]`` log π_ref(y_l|x).
      policy_explore_logps: ``[B]`` log π(y_ref|x) of a response sampled from π_ref.
      ref_explore_logps: ``[B]`` log π_ref(y_ref|x).
      chosen_lengths: unused (uniform pairwise signature).
      rejected_lengths: unused (uniform pairwise signature).
      reduction: ``"mean"`` or ``"sum"``.
      beta: DPO β.
      alpha: optimism coefficient α ≥ 0 (the paper uses 0.001 to 0.0001).

    Returns:
      ``(loss, metrics)``: DPO's metrics (``pairwise.dpo_loss``) plus ``"dpo_loss"`` and
      ``"explore_rewards"`` (mean implicit reward ``β log π/π_ref`` of the explored responses).
    """
    del chosen_lengths, rejected_lengths
    chex.assert_rank([policy_explore_logps, ref_explore_logps], 1)
    chex.assert_equal_shape([policy_chosen_logps, policy_explore_logps, ref_explore_logps])
    dpo, metrics = dpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        reduction=reduction,
        beta=beta,
    )
    explore_rewards = beta * (policy_explore_logps - ref_explore_logps)
    optimism, _ = reduce_loss(alpha * explore_rewards, reduction=reduction)
    metrics = dict(metrics)
    metrics["dpo_loss"] = jax.lax.stop_gradient(dpo)
    metrics["explore_rewards"] = jnp.mean(jax.lax.stop_gradient(explore_rewards))
    return dpo + optimism, metrics
