"""Preference strength from a reward-model ensemble, and the losses that use it.

Wang et al. (2024), "Secrets of RLHF in Large Language Models Part II: Reward
Modeling", sec. 2: train M reward models on the same preference data (different
orders / seeds) and measure, for each pair ``i``, the score differences
``d_{i,m} = r_m(x_i, y_c) − r_m(x_i, y_r)``. The preference strength of the pair is their
mean and standard deviation over the ensemble,

    û_i = (1/M) Σ_m d_{i,m},      σ̂_i = sqrt((1/M) Σ_m (d_{i,m} − û_i)²)

(the population standard deviation, 1/M, as the paper writes it). Pairs with û < 0 are
likely mislabelled, pairs with û ≈ 0 ambiguous. The paper then uses û to

- flip the labels of the pairs with the lowest strength (:func:`flip_labels`),
- smooth the labels of low-strength pairs (:func:`soft_labels`),
- add an adaptive margin ``û`` inside the logistic loss (:func:`adaptive_margin`),

all consumed by :func:`strength_reward_loss`. The paper's "Flip + Margin" recipe, for
example, is::

    mean, _ = preference_strength(ensemble_chosen, ensemble_rejected)
    chosen, rejected, strength, _ = flip_labels(chosen, rejected, mean)
    loss, metrics = strength_reward_loss(chosen, rejected, margin=adaptive_margin(strength))

Sec. 3 adds a contrastive term to the
reward loss, ``L = L_rm + β L_cl``: an instance-discrimination (SimCSE, Gao et al. 2021)
InfoNCE loss over representations of the responses, or over the *difference*
representations ``h_c − h_r`` of a pair, where the positive of each item is a second
view of the same item (a second forward pass with a different dropout mask) and the
other items of the batch are the negatives (:func:`info_nce_loss`,
:func:`preference_contrastive_loss`). The views are produced by the caller; this
module sees only the representations.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import Array

from rlhf_jax.objectives.links import logistic_loss
from rlhf_jax.objectives.reduction import Reduction, reduce_loss


def preference_strength(chosen_scores: Array, rejected_scores: Array) -> tuple[Array, Array]:
    """Mean and standard deviation of the ensemble's score differences per pair.

    ``û = mean_m (s_m(y_c) − s_m(y_r))`` and ``σ̂ = std_m(…)`` with the 1/M
    normalisation (Wang et al., 2024, sec. 2, "Measuring the Strength of Preferences").

    Args:
      chosen_scores: ``[M, B]`` scores of the chosen responses under M reward models.
      rejected_scores: ``[M, B]`` scores of the rejected responses.

    Returns:
      ``(mean [B], std [B])``.
    """
    chex.assert_rank([chosen_scores, rejected_scores], 2)
    chex.assert_equal_shape([chosen_scores, rejected_scores])
    differences = chosen_scores - rejected_scores
    return jnp.mean(differences, axis=0), jnp.std(differences, axis=0)


def flip_labels(
    chosen_scores: Array, rejected_scores: Array, strength: Array, *, threshold: float = 0.0
) -> tuple[Array, Array, Array, Array]:
    """Swap chosen and rejected on the pairs whose strength is below ``threshold``.

    The paper flips the pairs the ensemble disagrees with (û < 0 by default; a quantile
    of û, e.g. its 20th percentile, as in Wang et al., 2024, sec. 2, is passed as
    ``threshold``). A flipped pair's strength changes sign, so a margin computed from the
    returned strength points in the new direction.

    Args:
      chosen_scores: ``[B]`` scores of the labelled-chosen responses.
      rejected_scores: ``[B]`` scores of the labelled-rejected responses.
      strength: ``[B]`` preference strength û of each pair, in the labelled direction.
      threshold: pairs with ``û < threshold`` are flipped.

    Returns:
      ``(chosen [B], rejected [B], strength [B], flipped [B] bool)`` after flipping.
    """
    chex.assert_rank([chosen_scores, rejected_scores, strength], 1)
    chex.assert_equal_shape([chosen_scores, rejected_scores, strength])
    flipped = strength < threshold
    return (
        jnp.where(flipped, rejected_scores, chosen_scores),
        jnp.where(flipped, chosen_scores, rejected_scores),
        jnp.where(flipped, -strength, strength),
        flipped,
    )


def soft_labels(strength: Array, *, threshold: float = 0.0, smoothing: float = 0.1) -> Array:
    """Probability that the labelled-chosen response is preferred: ``1 − α`` on weak pairs.

    Label smoothing (Wang et al., 2024, sec. 2) replaces the hard label by
    ``1 − α`` on the pairs whose strength is below ``threshold`` and keeps 1 elsewhere
    ("Soft Label + Margin" smooths the pairs with û < 0).

    Args:
      strength: ``[B]`` preference strength û.
      threshold: pairs with ``û < threshold`` are smoothed.
      smoothing: α.

    Returns:
      ``[B]`` label probabilities ``p``.
    """
    chex.assert_rank(strength, 1)
    return jnp.where(strength < threshold, 1.0 - smoothing, 1.0).astype(strength.dtype)


def adaptive_margin(strength: Array, *, scale: float = 1.0) -> Array:
    """The adaptive margin ``m = scale · û`` (Wang et al., 2024, sec. 2, "Adaptive Margin").

    The paper uses ``m = û(x, y)`` itself (``scale = 1``); a pair the ensemble finds
    strongly separated must then be separated by at least as much.
    """
    chex.assert_rank(strength, 1)
    return scale * strength


def strength_reward_loss(
    chosen_scores: Array,
    rejected_scores: Array,
    *,
    label_probs: Array | float = 1.0,
    margin: Array | float = 0.0,
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """Bradley–Terry loss with per-pair soft labels and an adaptive margin.

    With ``d = s(y_c) − s(y_r)``, ``ℓ(z) = −log σ(z)``, the label probability ``p`` and the
    margin ``m``:

        L = p ℓ(d − m) + (1 − p) ℓ(−d − m).

    ``p = 1, m = 0`` is the maximum-likelihood loss; ``p = 1 − α`` is the label-smoothed
    loss of Wang et al. (2024), sec. 2; ``m = û`` the adaptive-margin loss. The
    flipped-label term keeps the margin in its own direction, so with a scalar ``p``
    and ``m`` this is :func:`rlhf_jax.objectives.reward_model.bradley_terry_loss` with
    ``label_smoothing = 1 − p`` (the paper writes smoothing and margin separately and
    does not say how they combine in "Soft Label + Margin").

    Args:
      chosen_scores: ``[B]`` scores of the chosen responses.
      rejected_scores: ``[B]`` scores of the rejected responses.
      label_probs: scalar or ``[B]`` probability p that the chosen response is preferred.
      margin: scalar or ``[B]`` margin m.
      reduction: ``"mean"`` or ``"sum"`` over pairs.

    Returns:
      ``(loss, metrics)`` with ``"denominator"`` (pairs), ``"accuracy"`` (fraction with
      ``d > 0``) and ``"score_margin"`` (mean d).
    """
    chex.assert_rank([chosen_scores, rejected_scores], 1)
    chex.assert_equal_shape([chosen_scores, rejected_scores])
    difference = chosen_scores - rejected_scores
    per_pair = label_probs * logistic_loss(difference - margin) + (
        1.0 - label_probs
    ) * logistic_loss(-difference - margin)
    loss, denominator = reduce_loss(per_pair, reduction=reduction)
    difference = jax.lax.stop_gradient(difference)
    return loss, {
        "denominator": denominator,
        "accuracy": jnp.mean((difference > 0).astype(per_pair.dtype)),
        "score_margin": jnp.mean(difference),
    }


def _normalise(x: Array) -> Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def info_nce_loss(
    anchors: Array,
    positives: Array,
    *,
    temperature: float = 0.05,
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """SimCSE / InfoNCE instance-discrimination loss with in-batch negatives.

    ``ℓ_i = −log [exp(cos(a_i, p_i)/τ) / Σ_j exp(cos(a_i, p_j)/τ)]`` (Gao et al., 2021,
    "SimCSE", eq. 1; the instance-level contrastive loss of Wang et al., 2024, sec. 3).
    ``p_i`` is a second view of item ``i`` and the other ``p_j`` are its negatives.

    Args:
      anchors: ``[B, D]`` representations (first view).
      positives: ``[B, D]`` representations of the same items (second view).
      temperature: τ (SimCSE uses 0.05).
      reduction: ``"mean"`` or ``"sum"`` over items.

    Returns:
      ``(loss, metrics)`` with ``"denominator"`` (items) and ``"accuracy"`` (fraction of
      anchors whose most similar candidate is their own positive).
    """
    chex.assert_rank([anchors, positives], 2)
    chex.assert_equal_shape([anchors, positives])
    similarity = _normalise(anchors) @ _normalise(positives).T / temperature
    log_probs = jax.nn.log_softmax(similarity, axis=-1)
    per_item = -jnp.diagonal(log_probs)
    loss, denominator = reduce_loss(per_item, reduction=reduction)
    index = jnp.arange(anchors.shape[0])
    hits = jnp.argmax(jax.lax.stop_gradient(similarity), axis=-1) == index
    return loss, {"denominator": denominator, "accuracy": jnp.mean(hits.astype(per_item.dtype))}


def preference_contrastive_loss(
    chosen_repr: Array,
    rejected_repr: Array,
    chosen_repr_view: Array,
    rejected_repr_view: Array,
    *,
    temperature: float = 0.05,
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """InfoNCE over the preference-difference representations ``h_c − h_r`` of pairs.

    The anchor of pair ``i`` is ``h_c − h_r`` from one forward pass, its positive the same
    difference from a second pass (another dropout mask), and the other pairs of the
    batch are negatives (Wang et al., 2024, sec. 3, "difference representation"). The
    full reward-model objective is ``L_rm + β · this``.

    Args:
      chosen_repr: ``[B, D]`` representations of the chosen responses, first view.
      rejected_repr: ``[B, D]`` representations of the rejected responses, first view.
      chosen_repr_view: ``[B, D]`` chosen representations, second view.
      rejected_repr_view: ``[B, D]`` rejected representations, second view.
      temperature: τ.
      reduction: ``"mean"`` or ``"sum"`` over pairs.

    Returns:
      ``(loss, metrics)`` as :func:`info_nce_loss`.
    """
    chex.assert_equal_shape([chosen_repr, rejected_repr, chosen_repr_view, rejected_repr_view])
    return info_nce_loss(
        chosen_repr - rejected_repr,
        chosen_repr_view - rejected_repr_view,
        temperature=temperature,
        reduction=reduction,
    )
