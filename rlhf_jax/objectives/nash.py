"""Nash learning from human feedback: mixtures, tabular updates and parametric losses.

The β-regularised preference game (Munos et al., 2023, "Nash Learning from Human
Feedback") is the symmetric two-player zero-sum game

    max_π min_{π'}  P(π ≻ π') − τ KL(π ‖ μ) + τ KL(π' ‖ μ),

whose unique equilibrium satisfies ``π*(y) ∝ μ(y) exp(P(y ≻ π*)/τ)``. This module holds
the pieces the algorithms that approach it are made of, as functions over a response
axis (the last axis) or over sampled sequences:

- the geometric mixture ``π^μ_β ∝ π^{1−β} μ^β`` (Munos et al., 2023);
- closed-form tabular steps: Nash-MD (Munos et al., 2023), Nash-MP (Tiapkin et
  al., 2025, "Accelerating Nash Learning from Human Feedback via Mirror Prox") and
  the online-mirror-descent step of INPO (Zhang et al., 2024, "Iterative Nash Policy
  Optimization");
- the parametric losses: Nash-MD policy gradient (Munos et al., 2023), the Nash-MP
  proximal policy gradient, online IPO and IPO-MD (Calandriello et al., 2024, "Human
  Alignment of Large Language Models through Online Preference Optimisation"),
  and the INPO squared loss.

Preferences ``P(y ≻ y')`` lie in ``[0, 1]`` with ``P(y ≻ y') + P(y' ≻ y) = 1``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import Array

from rlhf_jax.objectives.pairwise import ipo_loss
from rlhf_jax.objectives.reduction import Reduction, reduce_loss


def geometric_mixture_logp(
    policy_logp: Array, ref_logp: Array, *, beta: float | Array, axis: int = -1
) -> Array:
    """``log π^μ_β`` with ``π^μ_β(y) ∝ π(y)^{1−β} μ(y)^β`` (Munos et al., 2023).

    Args:
      policy_logp: log π over a response / vocabulary axis.
      ref_logp: log μ, same shape.
      beta: mixture weight β ∈ [0, 1] (Nash-MD uses β = ητ).
      axis: the axis over which the mixture is normalised.

    Returns:
      The normalised log-mixture, same shape.
    """
    chex.assert_equal_shape([policy_logp, ref_logp])
    return jax.nn.log_softmax((1.0 - beta) * policy_logp + beta * ref_logp, axis=axis)


def preference_against_policy(preference: Array, opponent_logp: Array) -> Array:
    """``P(y ≻ π') = Σ_{y'} π'(y') P(y ≻ y')`` for every ``y``.

    Args:
      preference: ``[..., Y, Y]`` table ``P(y ≻ y')``.
      opponent_logp: ``[..., Y]`` log π'.

    Returns:
      ``[..., Y]``.
    """
    chex.assert_equal_shape_prefix([preference, opponent_logp], opponent_logp.ndim)
    return jnp.einsum("...ab,...b->...a", preference, jnp.exp(opponent_logp))


def nash_md_step(
    policy_logp: Array, ref_logp: Array, preference: Array, *, eta: float, tau: float
) -> Array:
    """One exact Nash-MD step (Munos et al., 2023).

    ``π_{t+1}(y) ∝ π^μ_t(y) exp(η P(y ≻ π^μ_t))`` with the regularised policy
    ``π^μ_t ∝ π_t^{1−ητ} μ^{ητ}``: a mirror-descent step on the KL-regularised game that
    plays against the mixture instead of the current policy.

    Args:
      policy_logp: ``[..., Y]`` log π_t.
      ref_logp: ``[..., Y]`` log μ.
      preference: ``[..., Y, Y]`` P(y ≻ y').
      eta: step size η (with ητ ≤ 1).
      tau: regularisation τ.

    Returns:
      ``[..., Y]`` log π_{t+1}.
    """
    mixture = geometric_mixture_logp(policy_logp, ref_logp, beta=eta * tau)
    return jax.nn.log_softmax(mixture + eta * preference_against_policy(preference, mixture))


def proximal_step(
    anchor_logp: Array,
    ref_logp: Array,
    payoff: Array,
    *,
    eta: float,
    beta: float,
) -> Array:
    """``argmax_π η (⟨π, payoff⟩ − β KL(π ‖ μ)) − KL(π ‖ π_k)`` in closed form.

    ``π ∝ (π_k μ^{ηβ} exp(η payoff))^{1/(1+ηβ)}``, the KL-proximal step on the
    β-regularised payoff that both Nash-MP steps take (Tiapkin et al., 2025).

    Args:
      anchor_logp: ``[..., Y]`` log π_k, the prox centre.
      ref_logp: ``[..., Y]`` log μ.
      payoff: ``[..., Y]`` the payoff of each response, e.g. ``P(y ≻ π_k)``.
      eta: step size η.
      beta: regularisation β.

    Returns:
      ``[..., Y]`` the log-policy of the step.
    """
    chex.assert_equal_shape([anchor_logp, ref_logp, payoff])
    return jax.nn.log_softmax(
        (anchor_logp + eta * beta * ref_logp + eta * payoff) / (1.0 + eta * beta)
    )


def nash_mp_step(
    policy_logp: Array, ref_logp: Array, preference: Array, *, eta: float, beta: float
) -> tuple[Array, Array]:
    """One exact Nash Mirror Prox step (Tiapkin et al., 2025), two preference queries.

    ``π_{k+1/2} = argmax_π η[P(π ≻ π_k) − β KL(π‖μ)] − KL(π‖π_k)`` (extrapolation), then
    ``π_{k+1} = argmax_π η[P(π ≻ π_{k+1/2}) − β KL(π‖μ)] − KL(π‖π_k)`` (update from the
    same centre π_k against the extrapolated opponent).

    Args:
      policy_logp: ``[..., Y]`` log π_k.
      ref_logp: ``[..., Y]`` log μ.
      preference: ``[..., Y, Y]`` P(y ≻ y').
      eta: step size η.
      beta: regularisation β.

    Returns:
      ``(log π_{k+1}, log π_{k+1/2})``.
    """
    half = proximal_step(
        policy_logp,
        ref_logp,
        preference_against_policy(preference, policy_logp),
        eta=eta,
        beta=beta,
    )
    full = proximal_step(
        policy_logp, ref_logp, preference_against_policy(preference, half), eta=eta, beta=beta
    )
    return full, half


def inpo_step(
    policy_logp: Array, ref_logp: Array, preference: Array, *, eta: float, tau: float
) -> Array:
    """The online-mirror-descent step INPO's loss targets (Zhang et al., 2024).

    ``π_{t+1}(y) ∝ π_t(y)^{1−ητ} μ(y)^{ητ} exp(η P(y ≻ π_t))``: mirror descent on the
    regularised payoff ``P(y ≻ π_t) − τ log(π/μ)`` with the policy itself as opponent. Its
    fixed point is the regularised equilibrium.

    Args:
      policy_logp: ``[..., Y]`` log π_t.
      ref_logp: ``[..., Y]`` log μ.
      preference: ``[..., Y, Y]`` P(y ≻ y').
      eta: step size η (ητ ≤ 1).
      tau: regularisation τ.

    Returns:
      ``[..., Y]`` log π_{t+1}.
    """
    payoff = preference_against_policy(preference, policy_logp)
    mixture_logits = (1.0 - eta * tau) * policy_logp + eta * tau * ref_logp
    return jax.nn.log_softmax(mixture_logits + eta * payoff)


def _check_sequences(*arrays: Array) -> None:
    chex.assert_rank(arrays[0], 1)
    chex.assert_equal_shape(arrays)


def nash_md_pg_loss(
    policy_logps: Array,
    ref_logps: Array,
    preferences: Array,
    *,
    tau: float,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """Nash-MD policy-gradient surrogate (Munos et al., 2023, "Nash-MD-PG").

    For ``y ∼ π_θ`` and an opponent ``y' ∼ π^μ_β`` (the geometric mixture, sampled
    separately), the gradient of ``P(π_θ ≻ π^μ_β) − τ KL(π_θ ‖ μ)`` is estimated by
    ``∇ log π_θ(y) · [P(y ≻ y') − ½ − τ log(π_θ(y)/μ(y))]`` (the ½ is a baseline). The
    returned loss is ``−sg[P − ½ − τ log(π_θ/μ)] · log π_θ(y)`` whose gradient is minus
    that estimate.

    Args:
      policy_logps: ``[B]`` log π_θ(y|x) of the sampled responses (differentiated).
      ref_logps: ``[B]`` log μ(y|x).
      preferences: ``[B]`` P(y ≻ y' | x) from the preference model (or a 0/1 label).
      tau: regularisation τ.
      weights: optional ``[B]`` sample weights (e.g. exact probabilities on a table).
      reduction: ``"mean"`` or ``"sum"``.

    Returns:
      ``(loss, metrics)`` with ``denominator``, ``mean_preference`` and ``mean_log_ratio``.
    """
    _check_sequences(policy_logps, ref_logps, preferences)
    log_ratio = policy_logps - ref_logps
    advantage = jax.lax.stop_gradient(preferences - 0.5 - tau * log_ratio)
    loss, denominator = reduce_loss(-advantage * policy_logps, weights, reduction=reduction)
    return loss, {
        "denominator": denominator,
        "mean_preference": jnp.mean(preferences),
        "mean_log_ratio": jnp.mean(jax.lax.stop_gradient(log_ratio)),
    }


def nash_mp_pg_loss(
    policy_logps: Array,
    ref_logps: Array,
    anchor_logps: Array,
    preferences: Array,
    *,
    beta: float,
    eta: float,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """Policy-gradient surrogate for one Nash-MP proximal step (Tiapkin et al., 2025).

    Each Nash-MP step maximises ``P(π_θ ≻ π_opp) − β KL(π_θ ‖ μ) − (1/η) KL(π_θ ‖ π_k)``
    (the opponent π_opp is π_k for the extrapolation step and π_{k+1/2} for the update).
    With ``y ∼ π_θ``, ``y' ∼ π_opp`` the score-function estimate of its gradient is
    ``∇ log π_θ(y) · [P(y ≻ y') − ½ − β log(π_θ/μ) − (1/η) log(π_θ/π_k)]``; the loss is
    its negated surrogate, as in ``nash_md_pg_loss``.

    Args:
      policy_logps: ``[B]`` log π_θ(y|x).
      ref_logps: ``[B]`` log μ(y|x).
      anchor_logps: ``[B]`` log π_k(y|x), the prox centre.
      preferences: ``[B]`` P(y ≻ y' | x).
      beta: regularisation β.
      eta: step size η.
      weights: optional ``[B]`` sample weights.
      reduction: ``"mean"`` or ``"sum"``.

    Returns:
      ``(loss, metrics)`` with ``denominator`` and ``mean_preference``.
    """
    _check_sequences(policy_logps, ref_logps, anchor_logps, preferences)
    advantage = jax.lax.stop_gradient(
        preferences - 0.5 - beta * (policy_logps - ref_logps) - (policy_logps - anchor_logps) / eta
    )
    loss, denominator = reduce_loss(-advantage * policy_logps, weights, reduction=reduction)
    return loss, {"denominator": denominator, "mean_preference": jnp.mean(preferences)}


def inpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    anchor_chosen_logps: Array,
    anchor_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    eta: float,
    tau: float,
    preference_probs: Array | None = None,
    weights: Array | None = None,
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """INPO's squared loss (Zhang et al., 2024), whose minimiser is ``inpo_step``.

    With pairs ``y, y' ∼ π_t`` labelled by the preference oracle,
    ``h = log(π(y_w)/π(y_l)) − ητ log(μ(y_w)/μ(y_l)) − (1−ητ) log(π_t(y_w)/π_t(y_l))`` and
    ``ℓ = (h − η/2)²``. With a soft label ``p = P(y_1 ≻ y_2)`` for an unordered pair the
    expected loss over the label is ``(h − η(p − ½))²`` up to a constant, which is what is
    computed (``p = 1`` recovers the chosen/rejected form). In population the minimiser
    satisfies ``log π(y) − (1−ητ) log π_t(y) − ητ log μ(y) = η P(y ≻ π_t) + c``.

    Args:
      policy_chosen_logps: ``[B]`` log π(y_1) (differentiated).
      policy_rejected_logps: ``[B]`` log π(y_2).
      anchor_chosen_logps: ``[B]`` log π_t(y_1), the previous iterate.
      anchor_rejected_logps: ``[B]`` log π_t(y_2).
      ref_chosen_logps: ``[B]`` log μ(y_1).
      ref_rejected_logps: ``[B]`` log μ(y_2).
      eta: step size η.
      tau: regularisation τ.
      preference_probs: ``[B]`` P(y_1 ≻ y_2); None means y_1 is the chosen response.
      weights: optional ``[B]`` sample weights.
      reduction: ``"mean"`` or ``"sum"``.

    Returns:
      ``(loss, metrics)`` with ``denominator``.
    """
    _check_sequences(
        policy_chosen_logps,
        policy_rejected_logps,
        anchor_chosen_logps,
        anchor_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
    )
    if preference_probs is None:
        preference_probs = jnp.ones_like(policy_chosen_logps)
    h = (
        (policy_chosen_logps - policy_rejected_logps)
        - eta * tau * (ref_chosen_logps - ref_rejected_logps)
        - (1.0 - eta * tau) * jax.lax.stop_gradient(anchor_chosen_logps - anchor_rejected_logps)
    )
    target = eta * (preference_probs - 0.5)
    loss, denominator = reduce_loss(jnp.square(h - target), weights, reduction=reduction)
    return loss, {"denominator": denominator, "mean_h": jnp.mean(jax.lax.stop_gradient(h))}


def online_ipo_loss(
    policy_first_logps: Array,
    policy_second_logps: Array,
    ref_first_logps: Array,
    ref_second_logps: Array,
    preference_probs: Array,
    *,
    tau: float,
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """Online IPO (Calandriello et al., 2024): the IPO loss on self-generated pairs.

    Both responses are sampled from the current policy (treated as data, no gradient
    through the sampling) and annotated with ``p = P(y_1 ≻ y_2)`` by the preference model;
    the loss is IPO's ``(h − (p − ½)/τ)²`` with ``h = log(π(y_1)/μ(y_1)) −
    log(π(y_2)/μ(y_2))`` (``pairwise.ipo_loss`` with ``beta=τ``). Its stationary points
    satisfy ``π(y) ∝ μ(y) exp(P(y ≻ π)/τ)``, the regularised Nash equilibrium, which is
    the equivalence with Nash-MD shown by Calandriello et al. (2024).

    Args:
      policy_first_logps: ``[B]`` log π(y_1|x).
      policy_second_logps: ``[B]`` log π(y_2|x).
      ref_first_logps: ``[B]`` log μ(y_1|x).
      ref_second_logps: ``[B]`` log μ(y_2|x).
      preference_probs: ``[B]`` P(y_1 ≻ y_2 | x) (or 0/1 labels).
      tau: regularisation τ.
      reduction: ``"mean"`` or ``"sum"``.

    Returns:
      ``(loss, metrics)`` from ``ipo_loss`` (with ``denominator``).
    """
    return ipo_loss(
        policy_first_logps,
        policy_second_logps,
        ref_first_logps,
        ref_second_logps,
        beta=tau,
        preference_probs=preference_probs,
        reduction=reduction,
    )


def ipo_md_loss(
    policy_first_logps: Array,
    policy_second_logps: Array,
    ref_first_logps: Array,
    ref_second_logps: Array,
    preference_probs: Array,
    *,
    tau: float,
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """IPO-MD (Calandriello et al., 2024): online IPO on pairs from the geometric mixture.

    The loss is the one of ``online_ipo_loss``; what differs is the data: ``y_1, y_2`` are
    sampled from ``π^μ_β ∝ π^{1−β} μ^β`` (``geometric_mixture_logp``; the sampler combines
    the logits of π and μ token by token) rather than from π. Its stationary points satisfy
    ``π(y) ∝ μ(y) exp(P(y ≻ π^μ_β)/τ)``, which tends to the regularised equilibrium as
    β → 0 and, like Nash-MD's, plays against the smoothed opponent.

    Args:
      policy_first_logps: ``[B]`` log π(y_1|x) for ``y_1 ∼ π^μ_β``.
      policy_second_logps: ``[B]`` log π(y_2|x) for ``y_2 ∼ π^μ_β``.
      ref_first_logps: ``[B]`` log μ(y_1|x).
      ref_second_logps: ``[B]`` log μ(y_2|x).
      preference_probs: ``[B]`` P(y_1 ≻ y_2 | x).
      tau: regularisation τ.
      reduction: ``"mean"`` or ``"sum"``.

    Returns:
      ``(loss, metrics)`` with ``denominator``.
    """
    return online_ipo_loss(
        policy_first_logps,
        policy_second_logps,
        ref_first_logps,
        ref_second_logps,
        preference_probs,
        tau=tau,
        reduction=reduction,
    )
