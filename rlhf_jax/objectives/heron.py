"""HERON: preferences from a ranked hierarchy of reward factors.

Bukharin et al. (2023/2025), "Deep Reinforcement Learning from Hierarchical Preference
Design" (HERON). Instead of hand-weighting K feedback signals ("reward factors") into
one reward, an expert ranks them by importance, and two responses (trajectories) are
compared with the decision tree that ranking induces: look at the most important
factor; if the two responses differ on it by more than its margin ``δ_1``, the one with
the larger value is preferred; otherwise go to the next factor, and so on. If no factor
separates them, the pair gets no label and is left out. The labels train a
Bradley–Terry reward model, which then drives policy optimisation.

Factors are oriented so that larger is better (negate a factor whose smaller values
are better) and given already sorted by importance, ``factors[..., 0]`` the most
important. The paper sets each margin as a multiple of that factor's standard
deviation over the data (:func:`scaled_margins`), so the tree is invariant to each
factor's scale. The authors' reference implementation compares levels 3 and 4 with
the scale of level 2; this module uses each level's own margin, as the paper describes.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import Array

from rlhf_jax.objectives.reduction import Reduction, reduce_loss


def scaled_margins(factors: Array, scale: Array | float) -> Array:
    """Margins ``δ_k = scale_k · std(f_k)`` from a sample of factor values.

    Args:
      factors: ``[N, K]`` factor values of N responses.
      scale: scalar or ``[K]`` multiples of each factor's standard deviation.

    Returns:
      ``[K]`` margins.
    """
    chex.assert_rank(factors, 2)
    return scale * jnp.std(factors, axis=0)


def hierarchical_compare(
    factors_a: Array, factors_b: Array, margins: Array | float = 0.0
) -> tuple[Array, Array]:
    """Compare pairs of responses down the importance hierarchy.

    At the first level ``k`` (in importance order) where
    ``|f_k(a) − f_k(b)| > δ_k``, the label is ``sign(f_k(a) − f_k(b))``; if there is no
    such level the pair is unlabelled.

    Args:
      factors_a: ``[B, K]`` factor values of the first responses, most important first.
      factors_b: ``[B, K]`` factor values of the second responses.
      margins: scalar or ``[K]`` margins δ (non-negative).

    Returns:
      ``(label [B], level [B])``: ``label`` is ``+1`` if a is preferred, ``−1`` if b is,
      ``0`` if no level decides; ``level`` is the deciding level's index, or ``K`` when
      none decides.
    """
    chex.assert_rank([factors_a, factors_b], 2)
    chex.assert_equal_shape([factors_a, factors_b])
    num_levels = factors_a.shape[1]
    difference = factors_a - factors_b
    decides = jnp.abs(difference) > margins
    level = jnp.where(jnp.any(decides, axis=1), jnp.argmax(decides, axis=1), num_levels)
    deciding_difference = jnp.take_along_axis(
        difference, jnp.minimum(level, num_levels - 1)[:, None], axis=1
    )[:, 0]
    label = jnp.where(level < num_levels, jnp.sign(deciding_difference), 0.0)
    return label.astype(factors_a.dtype), level


def heron_reward_loss(
    scores_a: Array,
    scores_b: Array,
    labels: Array,
    *,
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """Bradley–Terry loss on HERON labels, unlabelled pairs excluded.

    ``L = Σ_i |t_i| ℓ(t_i (s(a_i) − s(b_i))) / Σ_i |t_i|`` with ``t ∈ {+1, −1, 0}`` from
    :func:`hierarchical_compare` and ``ℓ(z) = −log σ(z)`` (the Bradley–Terry reward
    model of Bukharin et al.).

    Args:
      scores_a: ``[B]`` reward-model scores of the first responses.
      scores_b: ``[B]`` scores of the second responses.
      labels: ``[B]`` labels ``+1 / −1 / 0``.
      reduction: ``"mean"`` (over labelled pairs) or ``"sum"``.

    Returns:
      ``(loss, metrics)`` with ``"denominator"`` (labelled pairs), ``"accuracy"`` (labelled
      pairs the scores order as the label does) and ``"labelled_fraction"``.
    """
    chex.assert_rank([scores_a, scores_b, labels], 1)
    chex.assert_equal_shape([scores_a, scores_b, labels])
    labels = labels.astype(scores_a.dtype)
    signed = labels * (scores_a - scores_b)
    labelled = jnp.abs(labels)
    loss, denominator = reduce_loss(-jax.nn.log_sigmoid(signed), labelled, reduction=reduction)
    signed = jax.lax.stop_gradient(signed)
    count = jnp.maximum(jnp.sum(labelled), 1.0)
    return loss, {
        "denominator": denominator,
        "accuracy": jnp.sum((signed > 0) * labelled) / count,
        "labelled_fraction": jnp.mean(labelled),
    }
