"""A reward model of sparse binary user feedback, and multi-objective reward combination.

Han et al. (2025), "Reinforcement Learning from User Feedback" (RLUF): users leave a
lightweight positive reaction (a "Love" reaction) on a small fraction of responses. A
reward model ``P[Love](x, y) = σ(s(x, y))`` is trained as a binary classifier on logged
(prompt, response, reacted?) triples, and its score is used as one objective beside
helpfulness and safety rewards in multi-objective policy optimisation.

Because positives are rare, the cross-entropy is class-weighted,

    L = w₊ · y · ℓ(s) + w₋ · (1 − y) · ℓ(−s),   ℓ(z) = −log σ(z),

whose population minimiser at a point with positive rate p is

    s* = log(w₊ p / (w₋ (1 − p))) = logit p + log(w₊ / w₋):

weighting shifts the learned logit by the known constant ``log(w₊/w₋)``, which
:func:`calibrated_logit` removes to read the calibrated P[Love] back. (Re-sampling the
classes by the same ratios has the same effect in expectation.)

:func:`love_reward` turns the score into a reward (the log-probability ``log P[Love]``,
the logit, or the probability) and :func:`combine_rewards` forms the weighted sum
``r = Σ_k w_k r_k`` of named reward scores. The paper combines its objectives inside its
own multi-objective optimiser (per-objective rewards with constraints); the weighted sum
here is the simplest combination and the one a single-reward policy-gradient step can
consume directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import chex
import jax
import jax.numpy as jnp
from jax import Array

from rlhf_jax.objectives.reduction import Reduction, reduce_loss

LoveRewardKind = Literal["log_prob", "logit", "prob"]


def weighted_binary_cross_entropy(
    logits: Array,
    labels: Array,
    *,
    positive_weight: float = 1.0,
    negative_weight: float = 1.0,
    mask: Array | None = None,
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """Class-weighted binary cross-entropy on logits (see the module docstring).

    Args:
      logits: ``[B]`` scores s, ``P[Love] = σ(s)``.
      labels: ``[B]`` 1 where the response received positive feedback, else 0 (bool or
        float; soft labels in [0, 1] are accepted).
      positive_weight: w₊.
      negative_weight: w₋.
      mask: optional ``[B]`` mask of the examples to count.
      reduction: ``"mean"`` (divides by the number of examples counted, not by the total
        weight, so that the weights set the trade-off and not the scale) or ``"sum"``.

    Returns:
      ``(loss, metrics)`` with ``"denominator"``, ``"accuracy"`` (``s > 0`` agrees with the
      label), ``"positive_rate"`` (of the labels) and ``"mean_probability"`` (of σ(s)).
    """
    chex.assert_rank([logits, labels], 1)
    chex.assert_equal_shape([logits, labels])
    labels = labels.astype(logits.dtype)
    per_example = positive_weight * labels * -jax.nn.log_sigmoid(logits) + (
        negative_weight * (1.0 - labels) * -jax.nn.log_sigmoid(-logits)
    )
    loss, denominator = reduce_loss(per_example, mask, reduction=reduction)
    weights = jnp.ones_like(per_example) if mask is None else mask.astype(per_example.dtype)
    count = jnp.maximum(jnp.sum(weights), 1.0)
    logits = jax.lax.stop_gradient(logits)
    agrees = (logits > 0).astype(labels.dtype) == (labels > 0.5)
    return loss, {
        "denominator": denominator,
        "accuracy": jnp.sum(agrees * weights) / count,
        "positive_rate": jnp.sum(labels * weights) / count,
        "mean_probability": jnp.sum(jax.nn.sigmoid(logits) * weights) / count,
    }


def balanced_class_weights(positive_rate: Array | float) -> tuple[Array, Array]:
    """Weights that give both classes equal total weight: ``w₊ = 1/(2p)``, ``w₋ = 1/(2(1 − p))``.

    With these, the weighted loss over a data set with positive rate p counts the
    positives and the negatives equally (and their mean weight is 1).
    """
    positive_rate = jnp.asarray(positive_rate)
    return 0.5 / positive_rate, 0.5 / (1.0 - positive_rate)


def calibrated_logit(
    logits: Array, *, positive_weight: float | Array = 1.0, negative_weight: float | Array = 1.0
) -> Array:
    """Undo the class-weighting shift: ``s − log(w₊ / w₋)`` is the logit of P[Love]."""
    return logits - jnp.log(positive_weight) + jnp.log(negative_weight)


def love_reward(logits: Array, *, kind: LoveRewardKind = "log_prob") -> Array:
    """A reward from the (calibrated) P[Love] logit s.

    ``"log_prob"``: ``log σ(s) = log P[Love]`` (≤ 0, bounded above, so a policy gains
    little by pushing an already-loved response further); ``"logit"``: s itself;
    ``"prob"``: ``σ(s)``.
    """
    if kind == "log_prob":
        return jax.nn.log_sigmoid(logits)
    if kind == "logit":
        return logits
    if kind == "prob":
        return jax.nn.sigmoid(logits)
    raise ValueError(f"kind must be 'log_prob', 'logit' or 'prob', got {kind!r}")


def combine_rewards(rewards: Mapping[str, Array], weights: Mapping[str, float | Array]) -> Array:
    """The weighted sum ``r = Σ_k w_k r_k`` of named reward scores.

    Args:
      rewards: name → ``[B]`` scores (e.g. ``{"helpfulness": …, "safety": …,
        "love": love_reward(…)}``).
      weights: name → weight ``w_k``; must name exactly the same objectives.

    Returns:
      ``[B]`` combined rewards.

    Raises:
      ValueError: naming the objectives present in one mapping and not the other.
    """
    if set(rewards) != set(weights):
        missing = sorted(set(rewards) - set(weights))
        unknown = sorted(set(weights) - set(rewards))
        raise ValueError(
            f"combine_rewards: objectives without a weight {missing}, "
            f"weights for unknown objectives {unknown}"
        )
    names = sorted(rewards)
    chex.assert_rank([rewards[name] for name in names], 1)
    chex.assert_equal_shape([rewards[name] for name in names])
    return sum(weights[name] * rewards[name] for name in names)
