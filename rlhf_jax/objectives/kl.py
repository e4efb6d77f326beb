"""Per-token estimators of KL(π ‖ π_ref) from log-probabilities of sampled tokens.

Schulman (2020), "Approximating KL divergence" (http://joschu.net/blog/kl-approx.html).
With ``y ∼ π`` and the log-ratio ``log r = log π_ref(y) − log π(y)``:

- ``k1 = −log r``: unbiased, high variance, can be negative;
- ``k2 = ½ (log r)²``: biased (its mean is an f-divergence that agrees with the KL to
  second order in ``log r``), low variance, non-negative;
- ``k3 = (r − 1) − log r``: unbiased (because ``E_π[r] = 1``), non-negative since
  ``x − 1 ≥ log x``, low variance when π and π_ref are close.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax.numpy as jnp
from jax import Array

from rlhf_jax.objectives.reduction import Reduction, reduce_loss

Estimator = Literal["k1", "k2", "k3"]


def kl_k1(logp: Array, ref_logp: Array) -> Array:
    """``k1 = log π(y) − log π_ref(y)``, elementwise (Schulman, 2020)."""
    chex.assert_equal_shape([logp, ref_logp])
    return logp - ref_logp


def kl_k2(logp: Array, ref_logp: Array) -> Array:
    """``k2 = ½ (log π_ref(y) − log π(y))²``, elementwise (Schulman, 2020)."""
    chex.assert_equal_shape([logp, ref_logp])
    return 0.5 * jnp.square(ref_logp - logp)


def kl_k3(logp: Array, ref_logp: Array) -> Array:
    """``k3 = exp(log r) − 1 − log r`` with ``log r = log π_ref(y) − log π(y)`` (Schulman, 2020).

    Written with ``expm1`` so that it is accurate (and exactly 0) when ``log r = 0``.
    """
    chex.assert_equal_shape([logp, ref_logp])
    log_ratio = ref_logp - logp
    return jnp.expm1(log_ratio) - log_ratio


def kl_estimate(logp: Array, ref_logp: Array, *, estimator: Estimator = "k1") -> Array:
    """The chosen per-token KL estimator (``"k1"``, ``"k2"`` or ``"k3"``), elementwise."""
    estimators = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
    if estimator not in estimators:
        raise ValueError(f"estimator must be one of {sorted(estimators)}, got {estimator!r}")
    return estimators[estimator](logp, ref_logp)


def kl_loss(
    logp: Array,
    ref_logp: Array,
    mask: Array,
    *,
    estimator: Estimator = "k3",
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """Masked per-token KL penalty, used as a loss term (e.g. GRPO's k3 penalty).

    ``loss = Σ_{b,t} m_{bt} k(logp_{bt}, ref_logp_{bt})`` divided by ``Σ m`` when
    ``reduction="mean"``.

    Args:
      logp: ``[B, T]`` log π of the sampled tokens.
      ref_logp: ``[B, T]`` log π_ref of the same tokens.
      mask: ``[B, T]`` 1 on response tokens, 0 on padding.
      estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
      reduction: ``"mean"`` or ``"sum"`` (see ``reduce_loss``).

    Returns:
      ``(loss, metrics)`` with ``metrics["denominator"]`` the number of tokens.
    """
    chex.assert_rank(logp, 2)
    chex.assert_equal_shape([logp, ref_logp, mask])
    per_token = kl_estimate(logp, ref_logp, estimator=estimator)
    loss, denominator = reduce_loss(per_token, mask, reduction=reduction)
    return loss, {"denominator": denominator}


def kl_penalised_rewards(
    scores: Array,
    logp: Array,
    ref_logp: Array,
    mask: Array,
    *,
    kl_coef: float | Array,
    estimator: Estimator = "k1",
) -> Array:
    """Dense per-token rewards with the KL penalty folded in (Ziegler et al., 2019).

    ``r_t = −β k(logp_t, ref_logp_t)`` on every response token, plus the sequence score
    ``R(x, y)`` on the last response token: ``Σ_t r_t = R − β Σ_t k_t``, whose expectation
    under π is ``E[R] − β KL(π ‖ π_ref)`` for the unbiased estimators.

    Args:
      scores: ``[B]`` sequence-level rewards.
      logp: ``[B, T]`` log π of the sampled tokens (treated as data: no gradient flows).
      ref_logp: ``[B, T]`` log π_ref of the same tokens.
      mask: ``[B, T]`` response mask.
      kl_coef: β.
      estimator: per-token KL estimator.

    Returns:
      ``[B, T]`` rewards, zero on masked positions.
    """
    chex.assert_rank([scores, logp], [1, 2])
    chex.assert_equal_shape([logp, ref_logp, mask])
    chex.assert_equal_shape_prefix([scores, logp], 1)
    mask = mask.astype(logp.dtype)
    penalty = -kl_coef * kl_estimate(logp, ref_logp, estimator=estimator)
    positions = jnp.arange(mask.shape[1])
    last = jnp.max(jnp.where(mask > 0, positions, -1), axis=1)
    is_last = positions[None, :] == last[:, None]
    return (penalty + jnp.where(is_last, scores[:, None], 0.0)) * mask
