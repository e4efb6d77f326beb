"""Reward- and cost-model losses on pairs of scalar scores.

Bradley–Terry reward modelling with an optional margin and label smoothing, and the
Safe-RLHF cost-model loss, which adds a per-response sign term so that the cost is
positive on unsafe responses and negative on safe ones.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import Array

from rlhf_jax.objectives.links import logistic_loss
from rlhf_jax.objectives.reduction import Reduction, reduce_loss


def bradley_terry_loss(
    chosen_scores: Array,
    rejected_scores: Array,
    *,
    margin: Array | float = 0.0,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """Bradley–Terry reward-model loss with a margin m and label smoothing ε.

    With ``d = s(y_w) − s(y_l)``:
    ``L = (1 − ε) ℓ(d − m) + ε ℓ(−d − m)``, ``ℓ(z) = −log σ(z)``. ε = m = 0 is the
    maximum-likelihood loss of Bradley & Terry (1952) as used by Ouyang et al. (2022),
    eq. 1; the margin is Llama 2's (Touvron et al., 2023, eq. 2); the flipped-label term
    keeps the margin in its own direction, so over a label ``Bernoulli(p)`` the loss is
    ``p̃ ℓ(d − m) + (1 − p̃) ℓ(−d − m)`` with ``p̃ = (1 − ε)p + ε(1 − p)``.

    Args:
      chosen_scores: ``[B]`` scores of the preferred responses.
      rejected_scores: ``[B]`` scores of the other responses.
      margin: scalar or ``[B]`` margin m.
      label_smoothing: ε, the assumed probability that a label is flipped.
      reduction: ``"mean"`` or ``"sum"`` over pairs.

    Returns:
      ``(loss, metrics)`` with ``"denominator"`` (pairs), ``"accuracy"`` (fraction with
      ``d > 0``), ``"score_margin"`` (mean d) and the mean chosen and rejected scores.
    """
    chex.assert_rank([chosen_scores, rejected_scores], 1)
    chex.assert_equal_shape([chosen_scores, rejected_scores])
    difference = chosen_scores - rejected_scores
    per_pair = (1.0 - label_smoothing) * logistic_loss(difference - margin) + (
        label_smoothing * logistic_loss(-difference - margin)
    )
    loss, denominator = reduce_loss(per_pair, reduction=reduction)
    difference = jax.lax.stop_gradient(difference)
    return loss, {
        "denominator": denominator,
        "accuracy": jnp.mean((difference > 0).astype(per_pair.dtype)),
        "score_margin": jnp.mean(difference),
        "chosen_scores": jnp.mean(jax.lax.stop_gradient(chosen_scores)),
        "rejected_scores": jnp.mean(jax.lax.stop_gradient(rejected_scores)),
    }


def cost_model_loss(
    more_harmful_costs: Array,
    less_harmful_costs: Array,
    more_harmful_is_unsafe: Array,
    less_harmful_is_unsafe: Array,
    *,
    sign_weight: float = 1.0,
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """Safe-RLHF cost-model loss: pairwise harm preference plus a per-response sign term.

    ``L = ℓ(C(y_w) − C(y_l)) + λ [ℓ(s_w C(y_w)) + ℓ(s_l C(y_l))]`` where ``y_w`` is the
    more harmful response, ``s = +1`` for an unsafe response and ``−1`` for a safe one,
    and ``ℓ(z) = −log σ(z)`` (Dai et al., 2023, "Safe RLHF", eq. 6, with λ = 1). The
    first term learns costs up to a constant; the sign term fixes the constant so that
    ``C > 0`` on unsafe and ``C < 0`` on safe responses.

    Args:
      more_harmful_costs: ``[B]`` costs C(y_w) of the more harmful responses.
      less_harmful_costs: ``[B]`` costs C(y_l) of the less harmful responses.
      more_harmful_is_unsafe: ``[B]`` bool, whether y_w is unsafe.
      less_harmful_is_unsafe: ``[B]`` bool, whether y_l is unsafe.
      sign_weight: λ, the weight of the sign term (0 gives a plain cost-preference model).
      reduction: ``"mean"`` or ``"sum"`` over pairs.

    Returns:
      ``(loss, metrics)`` with ``"denominator"``, ``"accuracy"`` (pairs ordered right),
      ``"sign_accuracy"`` (responses whose cost has the right sign) and the two parts.
    """
    arrays = [more_harmful_costs, less_harmful_costs, more_harmful_is_unsafe]
    chex.assert_rank([*arrays, less_harmful_is_unsafe], 1)
    chex.assert_equal_shape([*arrays, less_harmful_is_unsafe])
    sign_w = jnp.where(more_harmful_is_unsafe, 1.0, -1.0).astype(more_harmful_costs.dtype)
    sign_l = jnp.where(less_harmful_is_unsafe, 1.0, -1.0).astype(less_harmful_costs.dtype)
    preference = logistic_loss(more_harmful_costs - less_harmful_costs)
    sign = logistic_loss(sign_w * more_harmful_costs) + logistic_loss(sign_l * less_harmful_costs)
    per_pair = preference + sign_weight * sign
    loss, denominator = reduce_loss(per_pair, reduction=reduction)
    c_w = jax.lax.stop_gradient(more_harmful_costs)
    c_l = jax.lax.stop_gradient(less_harmful_costs)
    dtype = per_pair.dtype
    return loss, {
        "denominator": denominator,
        "accuracy": jnp.mean((c_w > c_l).astype(dtype)),
        "sign_accuracy": 0.5 * jnp.mean((sign_w * c_w > 0).astype(dtype) + (sign_l * c_l > 0)),
        "preference_loss": jnp.mean(preference),
        "sign_loss": jnp.mean(sign),
    }
