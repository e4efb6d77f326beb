"""Rationale-augmented DPO: preference pairs that come with a reason for the preference.

Just et al. (2024), "Data-Centric Human Preference Optimization with Rationales" (later
versions: "... with Rationales for Direct Preference Alignment"), factorise the likelihood
of a rationale-annotated preference as ``p(y_w ≻ y_l, r | x) = p(y_w ≻ y_l | x) ·
p(r | x, y_w ≻ y_l)`` and so add to the DPO loss the log-likelihood of the rationale ``r``
given the prompt and the pair (RDPO):

    L = L_DPO(π; x, y_w ≻ y_l) − γ log π(r | x, y_w, y_l),

so the policy also learns *why* ``y_w`` is preferred. ``rationale_logps`` is the summed
token log-probability of the rationale under the policy (conditioned on the prompt and
both responses), ``has_rationale`` masks the pairs without one, and
``rationale_length_normalise`` divides each rationale's log-likelihood by its token count
(``rationale_lengths``) for rationales of very different lengths. The rationale term is
averaged over the pairs, like the DPO term, so the reduction's denominator stays the
number of pairs. Without rationales (γ = 0 or an empty mask) the loss is DPO exactly.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import Array

from rlhf_jax.objectives.pairwise import dpo_loss
from rlhf_jax.objectives.reduction import Reduction, reduce_loss


def rationale_nll(
    rationale_logps: Array,
    has_rationale: Array | None = None,
    rationale_lengths: Array | None = None,
) -> Array:
    """Per-pair rationale NLL ``−m · log π(r|x, y_w, y_l) [/ |r|]``, ``[B]``.

    Pairs without a rationale (``m = 0``) contribute 0 even if their log-prob is not finite.
    """
    chex.assert_rank(rationale_logps, 1)
    nll = -rationale_logps
    if rationale_lengths is not None:
        chex.assert_equal_shape([rationale_logps, rationale_lengths])
        nll = nll / jnp.maximum(rationale_lengths.astype(nll.dtype), 1.0)
    if has_rationale is None:
        return nll
    chex.assert_equal_shape([rationale_logps, has_rationale])
    return jnp.where(has_rationale > 0, nll * has_rationale.astype(nll.dtype), 0.0)


def rationale_dpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    rationale_logps: Array,
    has_rationale: Array | None = None,
    rationale_lengths: Array | None = None,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    reduction: Reduction = "mean",
    beta: float = 0.1,
    rationale_weight: float = 1.0,
) -> tuple[Array, dict[str, Array]]:
    """``ℓ(β h) − γ log π(r | x, y_w, y_l)`` per pair (module docstring).

    Args:
      policy_chosen_logps: ``[B]`` log π(y_w|x).
      policy_rejected_logps: ``[B]`` log π(y_l|x).
      ref_chosen_logps: ``[B]`` log π_ref(y_w|x).
      ref_rejected_logps: ``[B]`` log π_ref(y_l|x).
      rationale_logps: ``[B]`` log π(r | x, y_w, y_l), summed over the rationale's tokens.
      has_rationale: optional ``[B]`` 1 where the pair has a rationale.
      rationale_lengths: optional ``[B]`` rationale token counts; when given, each
        rationale's log-likelihood is divided by its length.
      chosen_lengths: unused (uniform pairwise signature).
      rejected_lengths: unused (uniform pairwise signature).
      reduction: ``"mean"`` or ``"sum"`` over pairs.
      beta: DPO β.
      rationale_weight: γ ≥ 0.

    Returns:
      ``(loss, metrics)``: DPO's metrics plus ``"dpo_loss"`` and ``"rationale_nll"`` (the
      mean rationale NLL over the pairs that have one).
    """
    del chosen_lengths, rejected_lengths
    chex.assert_equal_shape([policy_chosen_logps, rationale_logps])
    dpo, metrics = dpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        reduction=reduction,
        beta=beta,
    )
    nll = rationale_nll(rationale_logps, has_rationale, rationale_lengths)
    rationale_term, _ = reduce_loss(rationale_weight * nll, reduction=reduction)
    count = jnp.sum(has_rationale) if has_rationale is not None else nll.shape[0]
    metrics = dict(metrics)
    metrics["dpo_loss"] = jax.lax.stop_gradient(dpo)
    metrics["rationale_nll"] = jax.lax.stop_gradient(jnp.sum(nll) / jnp.maximum(count, 1.0))
    return dpo + rationale_term, metrics
