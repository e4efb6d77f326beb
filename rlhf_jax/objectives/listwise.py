"""Listwise ranking losses over lists of ``K`` responses per prompt, ``[B, K]``.

Plackett–Luce for reward models (a ranked list's likelihood, Bradley–Terry for K = 2) and
LiPO-λ for policies (pairwise logistic losses weighted by LambdaLoss weights).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import Array

from rlhf_jax.objectives.reduction import Reduction, reduce_loss


def plackett_luce_loss(
    ranked_scores: Array, *, reduction: Reduction = "mean"
) -> tuple[Array, dict[str, Array]]:
    """Negative Plackett–Luce log-likelihood of a ranking, from scores in ranked order.

    ``L = −Σ_{i=1}^{K} [s_(i) − log Σ_{j ≥ i} exp s_(j)]`` where ``s_(1)`` is the score of
    the best response (Plackett, 1975; Luce, 1959; used for reward models by Zhu, Jordan
    & Jiao, 2023, "Principled RLHF from pairwise or K-wise comparisons"). For
    ``K = 2`` it is the Bradley–Terry loss ``−log σ(s_(1) − s_(2))``.

    Args:
      ranked_scores: ``[B, K]`` scores, each row ordered best first.
      reduction: ``"mean"`` or ``"sum"`` over lists.

    Returns:
      ``(loss, metrics)`` with ``"denominator"`` (lists) and ``"top1_accuracy"`` (lists
      whose first response has the highest score).
    """
    chex.assert_rank(ranked_scores, 2)
    tail_logsumexp = jax.lax.cumlogsumexp(ranked_scores, axis=ranked_scores.ndim - 1, reverse=True)
    per_list = jnp.sum(tail_logsumexp - ranked_scores, axis=-1)
    loss, denominator = reduce_loss(per_list, reduction=reduction)
    top1 = jnp.argmax(jax.lax.stop_gradient(ranked_scores), axis=-1) == 0
    return loss, {
        "denominator": denominator,
        "top1_accuracy": jnp.mean(top1.astype(per_list.dtype)),
    }


def lambda_weights(scores: Array, labels: Array) -> Array:
    """LambdaLoss weights ``Δ_ij = |G_i − G_j| · |1/D(τ_i) − 1/D(τ_j)|``, ``[..., K, K]``.

    Gain ``G = 2^ψ − 1`` of the label ψ, discount ``D(τ) = log₂(1 + τ)`` of the rank τ
    (1 = top) of each item under the current ``scores`` (Wang et al., 2018, "The
    LambdaLoss Framework"; Liu et al., 2024, "LiPO"). Not differentiated.
    """
    chex.assert_equal_shape([scores, labels])
    order = jnp.argsort(-jax.lax.stop_gradient(scores), axis=-1)
    ranks = jnp.argsort(order, axis=-1) + 1
    gain = jnp.exp2(labels.astype(scores.dtype)) - 1.0
    inverse_discount = 1.0 / jnp.log2(1.0 + ranks.astype(scores.dtype))
    weights = jnp.abs(gain[..., :, None] - gain[..., None, :]) * jnp.abs(
        inverse_discount[..., :, None] - inverse_discount[..., None, :]
    )
    return jax.lax.stop_gradient(weights)


def lipo_lambda_loss(
    policy_logps: Array,
    ref_logps: Array,
    labels: Array,
    *,
    beta: float = 0.1,
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """LiPO-λ: lambda-weighted pairwise logistic loss on the implicit rewards of a list.

    With ``s_i = β log π(y_i)/π_ref(y_i)``:
    ``L = Σ_{i,j: ψ_i > ψ_j} Δ_ij ℓ(s_i − s_j)``, ``ℓ(z) = −log σ(z)``, Δ from
    ``lambda_weights`` (Liu et al., 2024, "LiPO: Listwise Preference Optimization through
    Learning-to-Rank"). It does not depend on the order of the list. For a list
    of two with labels (1, 0) the weight is the constant ``1 − 1/log₂3``, so the loss is
    that constant times DPO (the paper weights each pair, it does not renormalise).

    Args:
      policy_logps: ``[B, K]`` per-sequence log π(y_i|x).
      ref_logps: ``[B, K]`` per-sequence log π_ref(y_i|x).
      labels: ``[B, K]`` graded preference labels ψ (higher is better).
      beta: β.
      reduction: ``"mean"`` or ``"sum"`` over lists.

    Returns:
      ``(loss, metrics)`` with ``"denominator"`` (lists) and ``"pair_accuracy"`` (ordered
      pairs ``ψ_i > ψ_j`` with ``s_i > s_j``).
    """
    chex.assert_rank([policy_logps, ref_logps, labels], 2)
    chex.assert_equal_shape([policy_logps, ref_logps, labels])
    scores = beta * (policy_logps - ref_logps)
    score_differences = scores[..., :, None] - scores[..., None, :]
    better = (labels[..., :, None] > labels[..., None, :]).astype(scores.dtype)
    pair_losses = -jax.nn.log_sigmoid(score_differences)
    per_list = jnp.sum(better * lambda_weights(scores, labels) * pair_losses, axis=(-2, -1))
    loss, denominator = reduce_loss(per_list, reduction=reduction)
    correct = better * (jax.lax.stop_gradient(score_differences) > 0)
    return loss, {
        "denominator": denominator,
        "pair_accuracy": jnp.sum(correct) / jnp.maximum(jnp.sum(better), 1.0),
    }
