"""Contrastive Preference Learning and the segment preference models it rests on.

Segments ``σ = (s_0, a_0, ..., s_{L-1}, a_{L-1})`` are given as ``[B, T]`` per-step
arrays with a ``[B, T]`` mask (1 on the steps of the segment, 0 on padding). Two models of
how a person prefers σ¹ over σ² (Knox et al., 2022, "Models of human preference for
learning reward functions"):

- partial return: ``P(σ¹ ≻ σ²) = σ(Σ_t γ^t r(σ¹_t) − Σ_t γ^t r(σ²_t))``;
- regret: ``P(σ¹ ≻ σ²) = σ(Σ_t γ^t A*(σ¹_t) − Σ_t γ^t A*(σ²_t))`` with ``A*`` the optimal
  advantage (for deterministic transitions the negated regret of a segment is
  ``Σ_t γ^t A*(s_t, a_t)``; Knox et al. use the hard optimum, Hejna et al. (2023) the
  MaxEnt one).

Contrastive Preference Learning (Hejna et al., 2023, "Contrastive Preference Learning:
Learning from Human Feedback without RL", §3.1) substitutes the MaxEnt identity
``A*(s, a) = α log π*(a|s)`` into the regret model and fits the policy directly:

    L_CPL = −log [ exp(Σ_t γ^t α log π(a⁺_t|s⁺_t))
                   / (exp(Σ_t γ^t α log π(a⁺_t|s⁺_t)) + exp(λ Σ_t γ^t α log π(a⁻_t|s⁻_t))) ]
          = ℓ(S⁺ − λ S⁻),     ℓ(z) = −log σ(z),   S = Σ_t γ^t α log π(a_t|s_t),

with λ ∈ (0, 1] the conservative bias of §3.2 (λ = 1 is plain CPL). With λ = 1, on a
complete set of segment comparisons labelled by the regret model, the unique minimiser is
π* (the policy enters only through ``α log π``, which the logistic fit pins to ``A*``).

On one-step segments with λ = 1, CPL is DPO with a uniform reference and β = α:
``ℓ(α log π(a⁺|s) − α log π(a⁻|s))`` equals ``pairwise.dpo_loss`` with
``ref_chosen_logps = ref_rejected_logps`` and ``beta = α`` (the MaxEnt entropy bonus is
the KL to the uniform policy up to a constant). With per-step reference log-probs the
scores become ``Σ_t γ^t α log π/π_ref`` (KL regularisation toward π_ref instead of the
MaxEnt entropy), and one-step CPL is ``dpo_loss`` with the same reference exactly.

The authors' implementation (jhejna/cpl) differs from the paper's objective in two ways that
are options here: it sums ``α (log π − log π_ref)`` over the segment without discount
(``discount=1`` with reference log-probs, π_ref being the BC-pretrained policy), and it
calls λ ``contrastive_bias``. Its BC regulariser (CPL-BC) is a separate loss (``sft``).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import Array

from rlhf_jax.objectives.reduction import Reduction, reduce_loss


def discounted_segment_sum(values: Array, mask: Array | None = None, *, discount: float) -> Array:
    """``Σ_t γ^t m_t v_t`` over the last axis of ``[B, T]`` values, ``[B]``.

    Padded steps (``m_t = 0``) may hold non-finite values; they are ignored.
    """
    chex.assert_rank(values, 2)
    discounts = discount ** jnp.arange(values.shape[-1], dtype=values.dtype)
    if mask is None:
        return jnp.sum(discounts * values, axis=-1)
    chex.assert_equal_shape([values, mask])
    return jnp.sum(jnp.where(mask > 0, discounts * values * mask, 0.0), axis=-1)


def partial_return_preference(
    rewards_1: Array,
    rewards_2: Array,
    mask_1: Array | None = None,
    mask_2: Array | None = None,
    *,
    discount: float = 1.0,
) -> Array:
    """``P(σ¹ ≻ σ²) = σ(Σ γ^t r¹_t − Σ γ^t r²_t)``, ``[B]`` (Knox et al., 2022)."""
    chex.assert_equal_shape([rewards_1, rewards_2])
    return jax.nn.sigmoid(
        discounted_segment_sum(rewards_1, mask_1, discount=discount)
        - discounted_segment_sum(rewards_2, mask_2, discount=discount)
    )


def regret_preference(
    advantages_1: Array,
    advantages_2: Array,
    mask_1: Array | None = None,
    mask_2: Array | None = None,
    *,
    discount: float = 1.0,
) -> Array:
    """``P(σ¹ ≻ σ²) = σ(Σ γ^t A*¹_t − Σ γ^t A*²_t)``, ``[B]``.

    The regret preference model (Knox et al., 2022, with deterministic transitions;
    Hejna et al., 2023, §2), from the optimal advantages ``A*(s_t, a_t)`` of the steps.
    """
    return partial_return_preference(advantages_1, advantages_2, mask_1, mask_2, discount=discount)


def cpl_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    chosen_mask: Array | None = None,
    rejected_mask: Array | None = None,
    *,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    alpha: float = 0.1,
    discount: float = 1.0,
    conservative_bias: float = 1.0,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """CPL loss ``ℓ(S⁺ − λ S⁻)`` with ``S = Σ_t γ^t α log π(a_t|s_t)`` (module docstring).

    Padded steps (mask 0) may hold non-finite log-probs; they are ignored.

    Args:
      policy_chosen_logps: ``[B, T]`` per-step ``log π(a_t|s_t)`` of the preferred segment.
      policy_rejected_logps: ``[B, T]`` the same for the other segment.
      chosen_mask: ``[B, T]`` 1 on steps of the preferred segment (None: all steps).
      rejected_mask: ``[B, T]`` the same for the other segment.
      ref_chosen_logps: optional ``[B, T]`` per-step ``log π_ref(a_t|s_t)`` of the preferred
        segment; when given (with ``ref_rejected_logps``) the scores use ``log π/π_ref``.
      ref_rejected_logps: optional ``[B, T]`` the same for the other segment.
      alpha: the MaxEnt temperature α (``A* = α log π*``).
      discount: γ.
      conservative_bias: λ ∈ (0, 1]; λ < 1 favours in-distribution actions (§3.2).
      weights: optional ``[B]`` pair weights (a mask, or exact pair probabilities).
      reduction: ``"mean"`` or ``"sum"`` (see ``reduction.reduce_loss``).

    Returns:
      ``(loss, metrics)`` with ``"denominator"``, the mean segment scores
      ``"chosen_scores"``/``"rejected_scores"`` and ``"accuracy"`` (fraction of pairs whose
      preferred segment scores higher).
    """
    chex.assert_rank([policy_chosen_logps, policy_rejected_logps], 2)
    chex.assert_equal_shape([policy_chosen_logps, policy_rejected_logps])
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither")
    if ref_chosen_logps is not None:
        chex.assert_equal_shape([policy_chosen_logps, ref_chosen_logps, ref_rejected_logps])
        policy_chosen_logps = policy_chosen_logps - ref_chosen_logps
        policy_rejected_logps = policy_rejected_logps - ref_rejected_logps
    chosen = alpha * discounted_segment_sum(policy_chosen_logps, chosen_mask, discount=discount)
    rejected = alpha * discounted_segment_sum(
        policy_rejected_logps, rejected_mask, discount=discount
    )
    per_pair = -jax.nn.log_sigmoid(chosen - conservative_bias * rejected)
    if weights is not None:
        chex.assert_shape(weights, per_pair.shape)
    loss, denominator = reduce_loss(per_pair, weights, reduction=reduction)
    chosen, rejected = jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)
    return loss, {
        "denominator": denominator,
        "chosen_scores": jnp.mean(chosen),
        "rejected_scores": jnp.mean(rejected),
        "accuracy": jnp.mean((chosen > rejected).astype(per_pair.dtype)),
    }
