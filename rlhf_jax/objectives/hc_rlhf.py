"""HC-RLHF: RLHF with a high-confidence cost constraint (a Seldonian algorithm).

Chittepu, Metevier, Schwarzer, Hoag, Niekum & Thomas (2025), "Reinforcement Learning from
Human Feedback with High-Confidence Safety Constraints". The goal is a policy whose
expected cost ``g(π) = E[c]`` is at most a threshold ``τ`` with probability at least
``1 − δ``. The data are split in two: candidate data, used while optimising, and held-out
safety data, used once at the end.

1. Candidate selection maximises the reward under a deliberately pessimistic constraint:
   the Student-t upper confidence bound of the mean cost, inflated because the candidate
   must later pass a test on data it has not seen,

       U_cand = ĉ + s · (κ_c · t_{1−δ, n_c−1} / √n_c + κ_s · t_{1−δ, n_s−1} / √n_s) ≤ τ,

   with ``ĉ`` and ``s`` the mean and (Bessel-corrected) standard deviation of the costs
   of the current samples (``n_c`` of them) and ``n_s`` the size of the safety set. The
   classic Seldonian inflation (Thomas et al., 2019, "Preventing undesirable behavior of
   intelligent machines") is ``κ_c = 0, κ_s = 2``, the defaults here: the predicted
   safety-test bound with its confidence width doubled. The authors' released code exposes
   both coefficients, with ``n_c`` the size of the current batch of samples (its scripts
   use ``κ_c = 4, κ_s = 2``).
2. The safety test computes the one-sided Student-t bound on the held-out costs,
   ``U = ĉ_s + t_{1−δ, n_s−1} · s_s / √n_s``, and returns the candidate if ``U ≤ τ``
   and "No Solution Found" otherwise. If the per-sample costs are normal (and
   approximately so by the central limit theorem), ``P(U < g(π)) ≤ δ``, so an unsafe
   candidate (``g(π) > τ``) is returned with probability at most δ whatever candidate
   selection did, because the safety data are independent of the candidate.

For optimisation with a Lagrange multiplier the constraint's gradient is needed: the
pessimistic bound ``μ + κ σ`` of the cost distribution under π has the score-function
gradient ``E_π[∇ log π · (c + κ (c² − 2 μ c) / (2σ))]`` (since ``∇σ = ∇(E c² − μ²)/(2σ)``),
so :func:`pessimistic_cost_per_sample` gives the per-sample cost to put in place of ``c``
in a REINFORCE / PPO Lagrangian (``safe_rlhf.lagrangian_reward``), the form the authors'
code uses. The Student-t quantile is computed in JAX (bisection on the regularised
incomplete beta function for ν < 20, the Cornish–Fisher expansion beyond), so the bounds
jit and vmap.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import Array

#: The safety test's verdicts.
PASS = "pass"
NO_SOLUTION_FOUND = "No Solution Found"

_BISECTION_STEPS = 64
#: From this many degrees of freedom on, the Cornish–Fisher expansion is used.
_EXPANSION_MIN_DF = 20.0


def _cornish_fisher_quantile(tail: Array, df: Array) -> Array:
    """``t_{1−tail, ν}`` from the normal quantile ``z`` by the Cornish–Fisher expansion to ``ν⁻⁴``.

    ``t = z + g₁/ν + g₂/ν² + g₃/ν³ + g₄/ν⁴`` (Abramowitz & Stegun, 1964, 26.7.5), with a
    relative error below 1e-5 for ``ν ≥ 20`` and ``tail ≥ 0.001``.
    """
    z = -jax.scipy.special.ndtri(tail)
    z2 = z * z
    g1 = z * (z2 + 1.0) / 4.0
    g2 = z * ((5.0 * z2 + 16.0) * z2 + 3.0) / 96.0
    g3 = z * (((3.0 * z2 + 19.0) * z2 + 17.0) * z2 - 15.0) / 384.0
    g4 = z * ((((79.0 * z2 + 776.0) * z2 + 1482.0) * z2 - 1920.0) * z2 - 945.0) / 92160.0
    inverse = 1.0 / df
    return z + inverse * (g1 + inverse * (g2 + inverse * (g3 + inverse * g4)))


def _bisection_quantile(tail: Array, df: Array) -> Array:
    """``t_{1−tail, ν}`` by bisection on ``x = ν/(ν+t²)`` in ``I_x(ν/2, ½) = 2·tail``."""
    a = 0.5 * df

    def bisect(_, bounds):
        low, high = bounds
        mid = 0.5 * (low + high)
        too_high = jax.scipy.special.betainc(a, 0.5, mid) > 2.0 * tail
        return jnp.where(too_high, low, mid), jnp.where(too_high, mid, high)

    low, high = jax.lax.fori_loop(
        0, _BISECTION_STEPS, bisect, (jnp.zeros_like(df), jnp.ones_like(df))
    )
    x = 0.5 * (low + high)
    return jnp.sqrt(df * (1.0 - x) / x)


def student_t_upper_quantile(tail: Array | float, df: Array | float) -> Array:
    """``t_{1−α, ν}``, the point with upper-tail probability ``α = tail`` under Student's t.

    For ``ν < 20``: since ``P(T > t) = ½ I_{ν/(ν+t²)}(ν/2, ½)`` for ``t > 0`` (``I`` the
    regularised incomplete beta function, increasing in its argument), ``x = ν/(ν+t²)``
    solves ``I_x(ν/2, ½) = 2α``, found by bisection on ``(0, 1)``; ``t = √(ν (1 − x)/x)``.
    For ``ν ≥ 20`` (where float32 ``betainc`` loses accuracy) the Cornish–Fisher
    expansion in ``1/ν`` around the normal quantile is used. Taking ``α`` rather than
    ``1 − α`` keeps small tail probabilities exact in float32. Broadcasts; jit- and
    vmap-compatible.

    Args:
      tail: upper-tail probability ``α ∈ (0, ½]``.
      df: degrees of freedom ``ν > 0``.

    Returns:
      ``t_{1−α, ν} ≥ 0`` (float32).
    """
    tail, df = jnp.broadcast_arrays(jnp.asarray(tail, jnp.float32), jnp.asarray(df, jnp.float32))
    expansion = _cornish_fisher_quantile(tail, jnp.maximum(df, _EXPANSION_MIN_DF))
    return jnp.where(df >= _EXPANSION_MIN_DF, expansion, _bisection_quantile(tail, df))


def student_t_quantile(p: Array | float, df: Array | float) -> Array:
    """The quantile ``t_{p, ν}`` of Student's t distribution, by symmetry from the upper tail.

    Args:
      p: probability in ``(0, 1)``.
      df: degrees of freedom ``ν > 0``.

    Returns:
      ``t_{p, ν}`` (float32), ``−t_{1−p, ν}`` for ``p < ½``.
    """
    p = jnp.asarray(p, jnp.float32)
    magnitude = student_t_upper_quantile(jnp.minimum(p, 1.0 - p), df)
    return jnp.where(p == 0.5, 0.0, jnp.sign(p - 0.5) * magnitude)


def _mean_std_count(samples: Array, mask: Array | None) -> tuple[Array, Array, Array]:
    """Mean, Bessel-corrected standard deviation and count of the masked ``[N]`` samples."""
    chex.assert_rank(samples, 1)
    weights = jnp.ones_like(samples) if mask is None else mask.astype(samples.dtype)
    chex.assert_equal_shape([samples, weights])
    count = jnp.sum(weights)
    mean = jnp.sum(weights * samples) / jnp.maximum(count, 1.0)
    variance = jnp.sum(weights * jnp.square(samples - mean)) / jnp.maximum(count - 1.0, 1.0)
    return mean, jnp.sqrt(variance), count


def student_t_upper_bound(samples: Array, *, delta: float, mask: Array | None = None) -> Array:
    """One-sided ``1 − δ`` upper confidence bound ``ĉ + t_{1−δ, n−1} s / √n`` on the mean.

    Args:
      samples: ``[N]`` i.i.d. samples (per-response costs).
      delta: failure probability δ.
      mask: optional ``[N]`` mask of the samples to use (``n`` is its sum, at least 2).

    Returns:
      The scalar bound.
    """
    mean, std, count = _mean_std_count(samples, mask)
    return mean + student_t_upper_quantile(delta, count - 1.0) * std / jnp.sqrt(count)


def pessimistic_cost_bound(
    costs: Array,
    *,
    delta: float,
    safety_size: int,
    candidate_coef: float = 0.0,
    safety_coef: float = 2.0,
    mask: Array | None = None,
) -> Array:
    """The inflated bound ``U_cand`` that candidate selection keeps below the threshold.

    ``U_cand = ĉ + s · (κ_c t_{1−δ, n_c−1} / √n_c + κ_s t_{1−δ, n_s−1} / √n_s)`` on the
    candidate costs (module docstring). ``κ_c = 0, κ_s = 1`` is the bound the safety test
    would compute if the safety data looked like the candidate data; the default
    ``κ_s = 2`` doubles its width, as in Thomas et al. (2019).

    Args:
      costs: ``[N]`` costs of the current (candidate) samples.
      delta: failure probability δ of the final guarantee.
      safety_size: ``n_s``, the number of held-out safety samples.
      candidate_coef: κ_c, the weight of the candidate sample's own confidence width.
      safety_coef: κ_s, the weight of the predicted safety-test width.
      mask: optional ``[N]`` mask of the samples to use.

    Returns:
      The scalar bound.
    """
    mean, std, count = _mean_std_count(costs, mask)
    safety_width = student_t_upper_quantile(delta, safety_size - 1.0) / jnp.sqrt(
        jnp.asarray(safety_size, jnp.float32)
    )
    candidate_width = student_t_upper_quantile(delta, count - 1.0) / jnp.sqrt(count)
    # κ_c = 0 must not depend on the candidate width (undefined for fewer than 2 samples).
    candidate_term = jnp.where(candidate_coef == 0, 0.0, candidate_coef * candidate_width)
    return mean + (safety_coef * safety_width + candidate_term) * std


def safety_test(
    safety_costs: Array, *, threshold: float, delta: float, mask: Array | None = None
) -> tuple[Array, Array]:
    """The HC-RLHF safety test on held-out costs: pass iff ``ĉ_s + t_{1−δ, n_s−1} s_s/√n_s ≤ τ``.

    Args:
      safety_costs: ``[N]`` costs of the candidate's responses to the held-out prompts.
      threshold: τ, the largest acceptable expected cost.
      delta: failure probability δ.
      mask: optional ``[N]`` mask.

    Returns:
      ``(passed, bound)``: a boolean scalar and the upper confidence bound. Turn ``passed``
      into the verdict with :func:`safety_verdict`.
    """
    bound = student_t_upper_bound(safety_costs, delta=delta, mask=mask)
    return bound <= threshold, bound


def safety_verdict(passed: bool | Array) -> str:
    """``"pass"`` when the safety test passed, else ``"No Solution Found"`` (host-side)."""
    return PASS if bool(passed) else NO_SOLUTION_FOUND


def pessimistic_cost_per_sample(
    costs: Array, *, coef: float, weights: Array | None = None
) -> Array:
    """Per-sample costs whose policy gradient is that of the pessimistic bound ``μ + κ σ``.

    ``c̃_i = c_i + κ (c_i² − 2 μ c_i) / (2 σ)`` with ``μ`` and ``σ`` the (weighted) batch
    mean and population standard deviation, held constant. For a score-function estimator,
    ``E_π[∇ log π · c̃] = ∇μ + κ ∇σ`` (module docstring); ``κ`` is the total width
    coefficient, e.g. ``κ_c t_{1−δ,n_c−1}/√n_c + κ_s t_{1−δ,n_s−1}/√n_s``.

    Args:
      costs: ``[N]`` per-response costs.
      coef: κ.
      weights: optional ``[N]`` non-negative sample weights (a mask, or probabilities for
        exact expectations) for the batch statistics.

    Returns:
      ``[N]`` augmented costs (constants).
    """
    chex.assert_rank(costs, 1)
    costs = jax.lax.stop_gradient(costs)
    weights = jnp.ones_like(costs) if weights is None else weights.astype(costs.dtype)
    chex.assert_equal_shape([costs, weights])
    total = jnp.maximum(jnp.sum(weights), jnp.finfo(costs.dtype).tiny)
    mean = jnp.sum(weights * costs) / total
    std = jnp.sqrt(jnp.sum(weights * jnp.square(costs - mean)) / total)
    return costs + coef * (jnp.square(costs) - 2.0 * mean * costs) / (
        2.0 * jnp.maximum(std, jnp.finfo(costs.dtype).tiny)
    )
