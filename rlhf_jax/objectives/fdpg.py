"""f-DPG: distributional policy gradients toward an energy-based target, for any f-divergence.

The target is ``p(y|x) = P(x, y)/Z(x)`` given by log-unnormalised scores ``log P`` (for the
KL-regularised RLHF target ``p ∝ π_ref exp(r/β)``, ``log P = log π_ref + r/β``). f-DPG
(Go et al., 2023, "Aligning Language Models with Preferences through f-divergence
Minimization", §2) minimises ``D_f(π_θ ‖ p) = E_p[f(π_θ/p)]`` with the gradient

    ∇_θ D_f(π_θ ‖ p) = E_{y∼π_θ}[ f'(π_θ(y)/p(y)) ∇_θ log π_θ(y) ]
                     = E_{y∼q}[ (π_θ(y)/q(y)) (f'(π_θ(y)/p(y)) − b) ∇_θ log π_θ(y) ],

for samples from a proposal q (q = π_θ on policy) and any constant baseline b, because
``E_q[(π_θ/q) ∇ log π_θ] = 0``. The loss here is the matching surrogate
``w · sg(f'(t) − b) · log π_θ(y)`` with ``w = sg(π_θ/q)`` and ``t = π_θ(y)/p(y)``, whose
gradient is the estimator above and whose value is not the divergence (the metrics report
the importance-sampled divergence ``E_q[(p/q) f(t)]`` instead).

Generators ``f`` with ``D_f(π ‖ p) = Σ p f(π/p)`` (f' up to the constants the baseline
absorbs):

- ``"forward_kl"``, KL(p ‖ π), the original DPG (Khalifa et al., 2021): ``f = −log t``,
  ``f' = −1/t``;
- ``"reverse_kl"``, KL(π ‖ p): ``f = t log t``, ``f' = log t + 1``;
- ``"jensen_shannon"``: ``f = ½[t log(2t/(1+t)) + log(2/(1+t))]``, ``f' = ½ log(2t/(1+t))``;
- ``"total_variation"``, ½Σ|π − p|: ``f = ½|t − 1|``, ``f' = ½ sign(t − 1)``.

The partition function ``Z(x)`` enters ``t`` for every divergence but reverse KL (whose f'
only shifts by ``log Z``, a constant); the caller supplies ``log Z`` per sample, exact on a
table or estimated by ``importance_log_partition``. The authors' library (naver/disco,
``FDivergenceLoss``) computes the same surrogate, estimates Z with a running
importance-sampling average and subtracts a windowed moving average of the pseudo-reward
``−f'`` as the baseline; here Z and the baseline are explicit inputs, so the function stays
pure.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp
from jax import Array

from rlhf_jax.objectives.reduction import Reduction, reduce_loss

Divergence = Literal["forward_kl", "reverse_kl", "jensen_shannon", "total_variation"]

DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jensen_shannon", "total_variation")


def f_value(log_ratio: Array, divergence: Divergence) -> Array:
    """The generator ``f(t)`` at ``t = exp(log_ratio)`` (module docstring)."""
    t = jnp.exp(log_ratio)
    if divergence == "forward_kl":
        return -log_ratio
    if divergence == "reverse_kl":
        return t * log_ratio
    if divergence == "jensen_shannon":
        log_mixture = jnp.logaddexp(0.0, log_ratio) - jnp.log(2.0)  # log((1 + t)/2)
        return 0.5 * (t * (log_ratio - log_mixture) - log_mixture)
    if divergence == "total_variation":
        return 0.5 * jnp.abs(t - 1.0)
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


def f_derivative(log_ratio: Array, divergence: Divergence) -> Array:
    """The derivative ``f'(t)`` at ``t = exp(log_ratio)`` (module docstring)."""
    if divergence == "forward_kl":
        return -jnp.exp(-log_ratio)
    if divergence == "reverse_kl":
        return log_ratio + 1.0
    if divergence == "jensen_shannon":
        return 0.5 * (jnp.log(2.0) + log_ratio - jnp.logaddexp(0.0, log_ratio))
    if divergence == "total_variation":
        return 0.5 * jnp.sign(log_ratio)
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


def importance_log_partition(target_log_scores: Array, proposal_logps: Array) -> Array:
    """``log Ẑ = log mean_i P(y_i)/q(y_i)`` over a ``[B]`` batch of samples ``y_i ∼ q``.

    Unbiased for Z (not for log Z); Go et al. (2023) keep a running average of it.
    """
    chex.assert_rank(target_log_scores, 1)
    chex.assert_equal_shape([target_log_scores, proposal_logps])
    log_weights = target_log_scores - proposal_logps
    return jax.nn.logsumexp(log_weights) - jnp.log(log_weights.shape[0])


def fdpg_loss(
    policy_logps: Array,
    proposal_logps: Array,
    target_log_scores: Array,
    log_partition: Array,
    *,
    divergence: Divergence = "forward_kl",
    baseline: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """f-DPG surrogate ``sg(π/q) · sg(f'(π/p) − b) · log π`` per sample (module docstring).

    Args:
      policy_logps: ``[B]`` log π_θ(y|x) of the samples (differentiated).
      proposal_logps: ``[B]`` log q(y|x) of the policy that sampled them.
      target_log_scores: ``[B]`` log P(x, y), the unnormalised target.
      log_partition: ``[B]`` log Z(x) of each sample's prompt.
      divergence: one of ``DIVERGENCES``.
      baseline: optional ``[B]`` baseline b subtracted from f' (unbiased for any b that
        does not depend on the sample).
      weights: optional ``[B]`` sample weights (a mask, or exact probabilities of the
        samples for a population objective).
      reduction: ``"mean"`` or ``"sum"`` (see ``reduction.reduce_loss``).

    Returns:
      ``(loss, metrics)`` with ``"denominator"``, ``"divergence"`` (the weighted mean of
      the importance-sampled ``(p/q) f(π/p)``, an estimate of ``D_f(π ‖ p)``),
      ``"importance_weight"`` (mean π/q) and ``"log_ratio"`` (mean log π/p).
    """
    chex.assert_rank(policy_logps, 1)
    chex.assert_equal_shape([policy_logps, proposal_logps, target_log_scores, log_partition])
    target_logps = target_log_scores - log_partition
    log_ratio = jax.lax.stop_gradient(policy_logps - target_logps)
    importance = jnp.exp(jax.lax.stop_gradient(policy_logps) - proposal_logps)
    signal = f_derivative(log_ratio, divergence)
    if baseline is not None:
        chex.assert_equal_shape([baseline, policy_logps])
        signal = signal - baseline
    per_sample = importance * jax.lax.stop_gradient(signal) * policy_logps
    loss, denominator = reduce_loss(per_sample, weights, reduction=reduction)
    divergence_terms = jnp.exp(target_logps - proposal_logps) * f_value(log_ratio, divergence)
    return loss, {
        "denominator": denominator,
        "divergence": reduce_loss(divergence_terms, weights)[0],
        "importance_weight": reduce_loss(importance, weights)[0],
        "log_ratio": reduce_loss(log_ratio, weights)[0],
    }
