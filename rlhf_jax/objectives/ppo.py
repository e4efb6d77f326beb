"""PPO losses over token sequences: clipped surrogate, clipped value loss, entropy bonus.

Schulman et al. (2017), "Proximal Policy Optimization Algorithms", eq. 7 (clipped
surrogate) and eq. 9 (combined objective). Token-level tensors are ``[B, T]`` with a
response mask. Two normalisations are offered:

- ``"token"``: every response token weighs the same, ``Σ_{b,t} m ℓ / Σ_{b,t} m``;
- ``"sequence"``: each sequence's mean over its tokens, then the mean over sequences.

With ``reduction="sum"`` the numerator is returned and ``metrics["denominator"]`` is the
token count (``"token"``) or the number of non-empty sequences (``"sequence"``), so
micro-batch losses can be summed and divided once by the full batch's denominator.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp
from jax import Array

from rlhf_jax.objectives.kl import kl_k3
from rlhf_jax.objectives.reduction import Reduction, masked_mean, reduce_loss

Normalisation = Literal["token", "sequence"]


def reduce_tokens(
    per_token: Array,
    mask: Array,
    *,
    normalisation: Normalisation = "token",
    reduction: Reduction = "mean",
) -> tuple[Array, Array]:
    """Reduce a ``[B, T]`` per-token loss with token- or sequence-level normalisation.

    Args:
      per_token: ``[B, T]`` losses.
      mask: ``[B, T]`` response mask.
      normalisation: ``"token"`` or ``"sequence"`` (see the module docstring).
      reduction: ``"mean"`` or ``"sum"``.

    Returns:
      ``(loss, denominator)`` as ``reduce_loss`` does.
    """
    chex.assert_rank(per_token, 2)
    chex.assert_equal_shape([per_token, mask])
    mask = mask.astype(per_token.dtype)
    if normalisation == "token":
        return reduce_loss(per_token, mask, reduction=reduction)
    if normalisation == "sequence":
        lengths = jnp.sum(mask, axis=1)
        per_sequence = jnp.sum(per_token * mask, axis=1) / jnp.maximum(lengths, 1.0)
        return reduce_loss(per_sequence, (lengths > 0).astype(per_token.dtype), reduction=reduction)
    raise ValueError(f"normalisation must be 'token' or 'sequence', got {normalisation!r}")


def ppo_policy_loss(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    mask: Array,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    normalisation: Normalisation = "token",
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """The PPO clipped surrogate loss (Schulman et al., 2017, eq. 7), negated for descent.

    ``ℓ_t = −min(ρ_t Â_t, clip(ρ_t, 1 − ε, 1 + ε_high) Â_t)`` with
    ``ρ_t = exp(logp_t − old_logp_t)``. Inside the clip range this is the unclipped
    importance-weighted surrogate ``−ρ Â``; once the ratio has moved past the range in the
    direction the advantage favours, the loss is flat in ρ and its gradient is zero.

    Args:
      logp: ``[B, T]`` log π_θ of the sampled tokens (differentiated).
      old_logp: ``[B, T]`` log π_old of the same tokens (the sampling policy; constant).
      advantages: ``[B, T]`` advantage estimates (constant).
      mask: ``[B, T]`` response mask.
      clip_eps: ε, the lower (and by default upper) clip width.
      clip_eps_high: ε_high for the upper side (asymmetric clipping); ``clip_eps`` if None.
      normalisation: ``"token"`` or ``"sequence"``.
      reduction: ``"mean"`` or ``"sum"``.

    Returns:
      ``(loss, metrics)``; metrics hold ``denominator``, ``clip_fraction`` (share of
      tokens whose clipped branch is active), ``approx_kl`` (k3 estimate of
      KL(π_old ‖ π_θ) per token) and ``ratio_mean``.
    """
    chex.assert_rank(logp, 2)
    chex.assert_equal_shape([logp, old_logp, advantages, mask])
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    old_logp = jax.lax.stop_gradient(old_logp)
    advantages = jax.lax.stop_gradient(advantages)
    ratio = jnp.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + eps_high) * advantages
    per_token = -jnp.minimum(unclipped, clipped)
    loss, denominator = reduce_tokens(
        per_token, mask, normalisation=normalisation, reduction=reduction
    )
    metrics = {
        "denominator": denominator,
        "clip_fraction": masked_mean((clipped < unclipped).astype(logp.dtype), mask),
        "approx_kl": masked_mean(jax.lax.stop_gradient(kl_k3(old_logp, logp)), mask),
        "ratio_mean": masked_mean(jax.lax.stop_gradient(ratio), mask),
    }
    return loss, metrics


def ppo_value_loss(
    values: Array,
    old_values: Array,
    returns: Array,
    mask: Array,
    *,
    clip_eps: float | None = 0.2,
    normalisation: Normalisation = "token",
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """Clipped value loss (as in the PPO baselines of Schulman et al., 2017; Ziegler et al., 2019).

    ``ℓ_t = ½ max((V_t − R_t)², (V_old,t + clip(V_t − V_old,t, −ε, ε) − R_t)²)``: the new
    value may not profit from moving more than ε away from the value at sampling time.
    ``clip_eps=None`` gives the plain squared error ``½ (V_t − R_t)²``.

    Args:
      values: ``[B, T]`` current value predictions (differentiated).
      old_values: ``[B, T]`` value predictions at sampling time (constant).
      returns: ``[B, T]`` value targets, e.g. GAE returns (constant).
      mask: ``[B, T]`` response mask.
      clip_eps: ε, or None for no clipping.
      normalisation: ``"token"`` or ``"sequence"``.
      reduction: ``"mean"`` or ``"sum"``.

    Returns:
      ``(loss, metrics)`` with ``denominator`` and ``value_clip_fraction``.
    """
    chex.assert_rank(values, 2)
    chex.assert_equal_shape([values, old_values, returns, mask])
    old_values = jax.lax.stop_gradient(old_values)
    returns = jax.lax.stop_gradient(returns)
    unclipped = jnp.square(values - returns)
    if clip_eps is None:
        per_token = 0.5 * unclipped
        clip_active = jnp.zeros_like(values)
    else:
        clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
        clipped = jnp.square(clipped_values - returns)
        per_token = 0.5 * jnp.maximum(unclipped, clipped)
        clip_active = (clipped > unclipped).astype(values.dtype)
    loss, denominator = reduce_tokens(
        per_token, mask, normalisation=normalisation, reduction=reduction
    )
    return loss, {"denominator": denominator, "value_clip_fraction": masked_mean(clip_active, mask)}


def token_entropy(logits: Array) -> Array:
    """Entropy ``H(π(·|s_t)) = −Σ_v π(v) log π(v)`` of each token's distribution, ``[B, T]``."""
    chex.assert_rank(logits, 3)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def entropy_bonus_loss(
    logits: Array,
    mask: Array,
    *,
    normalisation: Normalisation = "token",
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """Negative mean entropy, the loss form of PPO's entropy bonus (Schulman et al., 2017, eq. 9).

    Args:
      logits: ``[B, T, V]`` policy logits at the response positions.
      mask: ``[B, T]`` response mask.
      normalisation: ``"token"`` or ``"sequence"``.
      reduction: ``"mean"`` or ``"sum"``.

    Returns:
      ``(−H, metrics)`` with ``denominator``; adding ``c₂ · loss`` to the total loss
      maximises ``c₂ H``.
    """
    chex.assert_rank([logits, mask], [3, 2])
    chex.assert_equal_shape_prefix([logits, mask], 2)
    loss, denominator = reduce_tokens(
        -token_entropy(logits), mask, normalisation=normalisation, reduction=reduction
    )
    return loss, {"denominator": denominator}


def ppo_loss(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    values: Array,
    old_values: Array,
    returns: Array,
    mask: Array,
    *,
    logits: Array | None = None,
    clip_eps: float = 0.2,
    value_clip_eps: float | None = 0.2,
    value_coef: float = 0.5,
    entropy_coef: float = 0.0,
    normalisation: Normalisation = "token",
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """The combined PPO loss ``L^CLIP + c₁ L^VF − c₂ H`` (Schulman et al., 2017, eq. 9).

    Args:
      logp: ``[B, T]`` log π_θ of the sampled tokens.
      old_logp: ``[B, T]`` log π_old of the sampled tokens.
      advantages: ``[B, T]`` advantages.
      values: ``[B, T]`` current values.
      old_values: ``[B, T]`` values at sampling time.
      returns: ``[B, T]`` value targets.
      mask: ``[B, T]`` response mask.
      logits: ``[B, T, V]`` policy logits, needed only when ``entropy_coef > 0``.
      clip_eps: policy ratio clip ε.
      value_clip_eps: value clip ε (None: unclipped).
      value_coef: c₁.
      entropy_coef: c₂.
      normalisation: ``"token"`` or ``"sequence"``.
      reduction: ``"mean"`` or ``"sum"``; all terms share one denominator.

    Returns:
      ``(loss, metrics)`` with the three terms, the policy metrics and ``denominator``.
    """
    policy_loss, metrics = ppo_policy_loss(
        logp,
        old_logp,
        advantages,
        mask,
        clip_eps=clip_eps,
        normalisation=normalisation,
        reduction=reduction,
    )
    value_loss, value_metrics = ppo_value_loss(
        values,
        old_values,
        returns,
        mask,
        clip_eps=value_clip_eps,
        normalisation=normalisation,
        reduction=reduction,
    )
    loss = policy_loss + value_coef * value_loss
    metrics = {**metrics, **value_metrics, "policy_loss": policy_loss, "value_loss": value_loss}
    if entropy_coef > 0.0:
        if logits is None:
            raise ValueError("ppo_loss needs `logits` [B, T, V] when entropy_coef > 0")
        entropy_loss, _ = entropy_bonus_loss(
            logits, mask, normalisation=normalisation, reduction=reduction
        )
        loss = loss + entropy_coef * entropy_loss
        metrics["entropy_loss"] = entropy_loss
    return loss, metrics
