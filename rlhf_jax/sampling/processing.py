"""The next-token distribution a sampler draws from: mixing, temperature, top-k and top-p.

Everything here is a pure function of one decoding step's logits ``[B, V]``. The sampler
applies, in this order (the order of Holtzman et al., 2020, and of common practice):

1. combination of ``M`` models: ``z = Σ_i w_i · log_softmax(logits_i)`` (``combine_logits``);
2. temperature: ``z / T``;
3. top-k: keep the ``k`` most likely tokens (Fan, Lewis and Dauphin, 2018);
4. top-p (nucleus): keep the smallest set of most likely tokens whose probability under the
   top-k-renormalised distribution reaches ``p`` (Holtzman et al., 2020, Eq. 2-3);
5. renormalise: ``log q = log_softmax`` over the kept tokens, ``-inf`` elsewhere.

``log q`` is the distribution the token is drawn from, and the log-probability the
sampler reports for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
from jax import Array


def combine_logits(logits: Sequence[Array], weights: Array) -> Array:
    """Weighted sum of the models' normalised log-probabilities.

    ``z = Σ_i w_i · log_softmax(logits_i)``; ``log_softmax(z)`` is then the log of the
    normalised product ``Π_i π_i^{w_i} / Z``. With weights ``(1 - β, β)`` over a policy
    and a reference this is the geometric mixture ``π^{1-β} · π_ref^β / Z`` that Nash-MD
    draws its alternative responses from, one token at a time (Munos et al., 2024, "Nash
    Learning from Human Feedback"); other weights, negative ones included, give
    decoding-time guidance.

    Args:
      logits: ``M`` arrays of shape ``[..., V]``, one per model.
      weights: ``[M]`` mixture exponents.

    Returns:
      The unnormalised combined log-probabilities ``z``, shape ``[..., V]``, float32.
    """
    chex.assert_rank(weights, 1)
    chex.assert_axis_dimension(weights, 0, len(logits))
    chex.assert_equal_shape(list(logits))
    log_probs = [jax.nn.log_softmax(x.astype(jnp.float32), axis=-1) for x in logits]
    weights = weights.astype(jnp.float32)
    combined = weights[0] * log_probs[0]
    for i in range(1, len(log_probs)):
        combined = combined + weights[i] * log_probs[i]
    return combined


def top_k_mask(log_probs: Array, k: int) -> Array:
    """Boolean mask of the ``k`` largest entries of the last axis (ties at the k-th kept).

    Args:
      log_probs: ``[..., V]`` scores (log-probabilities or logits).
      k: number of tokens to keep, ``1 <= k``; ``k >= V`` keeps everything.

    Returns:
      Boolean ``[..., V]``: ``log_probs >= (k-th largest value)``.
    """
    if k < 1:
        raise ValueError(f"top_k must be >= 1 to filter, got {k}")
    vocab = log_probs.shape[-1]
    if k >= vocab:
        return jnp.ones(log_probs.shape, dtype=bool)
    kth_largest = jax.lax.top_k(log_probs, k)[0][..., -1:]
    return log_probs >= kth_largest


def top_p_mask(log_probs: Array, p: float) -> Array:
    """Boolean mask of the nucleus: the most likely tokens whose total probability reaches p.

    Sorting probabilities in decreasing order, token ``j`` is kept when the probability of
    the tokens before it is below ``p``: ``Σ_{i<j} q_(i) < p`` (Holtzman et al., 2020,
    "The Curious Case of Neural Text Degeneration", Eq. 2). The most likely token is
    always kept; ties with the least likely kept token are kept too.

    Args:
      log_probs: ``[..., V]`` normalised log-probabilities (``-inf`` allowed).
      p: nucleus mass, ``0 < p <= 1``; ``p >= 1`` keeps everything.

    Returns:
      Boolean ``[..., V]`` mask of the nucleus.
    """
    if not p > 0.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p >= 1.0:
        return jnp.ones(log_probs.shape, dtype=bool)
    sorted_log_probs = jnp.flip(jnp.sort(log_probs, axis=-1), axis=-1)
    sorted_probs = jnp.exp(sorted_log_probs)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    kept_count = jnp.sum(mass_before < p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_log_probs, kept_count - 1, axis=-1)
    return log_probs >= threshold


def sampling_log_probs(
    scores: Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> Array:
    """Log-probabilities of the distribution a token is drawn from.

    ``log q = log_softmax(mask(z / T))`` where ``mask`` sets tokens outside the top-k set
    and then outside the nucleus of the top-k-renormalised distribution to ``-inf``.

    Args:
      scores: ``[..., V]`` logits (or combined log-probabilities from ``combine_logits``).
      temperature: ``T > 0``.
      top_k: keep the ``k`` most likely tokens; ``0`` disables the filter.
      top_p: nucleus mass in ``(0, 1]``; ``1`` disables the filter.

    Returns:
      ``[..., V]`` float32 normalised log-probabilities, ``-inf`` on filtered tokens.
    """
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_q = jax.nn.log_softmax(scores.astype(jnp.float32) / temperature, axis=-1)
    if top_k > 0:
        log_q = jax.nn.log_softmax(jnp.where(top_k_mask(log_q, top_k), log_q, -jnp.inf), axis=-1)
    if top_p < 1.0:
        log_q = jax.nn.log_softmax(jnp.where(top_p_mask(log_q, top_p), log_q, -jnp.inf), axis=-1)
    return log_q
