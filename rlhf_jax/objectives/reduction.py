"""Reductions shared by every objective.

Every objective builds an array of per-item losses (per sequence, per pair or per token),
then reduces it here. ``reduction="mean"`` divides by the denominator (the number of
items, or the sum of the weights / mask); ``reduction="sum"`` returns the plain sum, so
that a caller accumulating gradients over micro-batches can sum the micro-batch losses
and divide once by the denominator of the whole batch. That makes eight batches of one
accumulate to exactly the update of one batch of eight, for sequence-level and
token-level normalisation alike. The denominator is always reported in the metrics as
``"denominator"``.
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
from jax import Array

Reduction = Literal["mean", "sum"]


def masked_sum(values: Array, mask: Array | None = None, axis: int | None = None) -> Array:
    """Sum of ``values * mask`` over ``axis`` (all axes when ``None``)."""
    if mask is None:
        return jnp.sum(values, axis=axis)
    return jnp.sum(values * mask.astype(values.dtype), axis=axis)


def masked_mean(values: Array, mask: Array | None = None, axis: int | None = None) -> Array:
    """Mean of ``values`` over the entries where ``mask`` is set (0 where none is)."""
    if mask is None:
        return jnp.mean(values, axis=axis)
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def reduce_loss(
    per_item: Array, weights: Array | None = None, *, reduction: Reduction = "mean"
) -> tuple[Array, Array]:
    """Reduce per-item losses to a scalar and report its denominator.

    Args:
      per_item: losses of any shape (``[B]`` per sequence, ``[B, T]`` per token).
      weights: optional weights or mask of the same shape; ``None`` counts every item.
      reduction: ``"mean"`` gives ``Σ w·ℓ / Σ w``; ``"sum"`` gives ``Σ w·ℓ``.

    Returns:
      ``(loss, denominator)`` where ``denominator = Σ w`` (or the item count).
    """
    if weights is None:
        total = jnp.sum(per_item)
        denominator = jnp.asarray(per_item.size, per_item.dtype)
    else:
        weights = weights.astype(per_item.dtype)
        total = jnp.sum(per_item * weights)
        denominator = jnp.sum(weights)
    if reduction == "sum":
        return total, denominator
    if reduction == "mean":
        return total / jnp.maximum(denominator, jnp.finfo(per_item.dtype).tiny), denominator
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
