"""Closed-form optima of preference objectives on the tabular harness, and their population losses.

Everything here is derived by hand from the loss definitions (derivations in the
docstrings) and computed without ``rlhf_jax.objectives``, so a test can minimise an
objective's exact population loss with ``core.minimise`` and compare the minimiser with
the closed form.

Conventions: tables are ``[X, Y]`` (prompt, response); pairs ``(y, y')`` are drawn from a
sampling policy μ, ``y ∼ μ``, ``y' ∼ μ`` independently (so ``y = y'`` happens), and
labelled ``y ≻ y'`` with probability ``P(y ≻ y' | x)``. ``P(y ≻ μ) = Σ_{y'} μ(y') P(y ≻ y')``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from rlhf_jax.tabular import core


def centred(table: Array) -> Array:
    """Subtract each prompt's mean: compares tables known up to a per-prompt constant."""
    return table - jnp.mean(table, axis=-1, keepdims=True)


def pair_weights(prompt_probs: Array, sampling_logp: Array, preference: Array) -> Array:
    """``w(x, y, y') = ρ(x) μ(y|x) μ(y'|x) P(y ≻ y'|x)``: probability of (chosen y, rejected y')."""
    return prompt_probs[:, None, None] * core.pair_probs(sampling_logp) * preference


def flip_labels(preference: Array, flip_rate: float) -> Array:
    """Preference observed through labels flipped at rate ε: ``(1 − ε)P + εPᵀ``."""
    return (1.0 - flip_rate) * preference + flip_rate * jnp.swapaxes(preference, -1, -2)


def per_pair_losses(loss_fn: Callable, **hyper) -> Callable[..., Array]:
    """Per-pair losses ``[N]`` of a batched objective, from flat ``[N]`` input arrays.

    ``loss_fn(*[B] arrays, reduction=, **hyper) -> (loss, metrics)`` is evaluated on each
    pair as a batch of one (under ``vmap``), so batch-coupled objectives (sorting, running
    statistics) see one pair at a time.
    """

    def single(*arrays: Array) -> Array:
        return loss_fn(*(a[None] for a in arrays), reduction="sum", **hyper)[0]

    return jax.vmap(single)


def all_pairs(table: Array) -> tuple[Array, Array]:
    """``(chosen, rejected)`` entries of a ``[X, Y, ...]`` table for every ordered pair.

    Returns two ``[X·Y·Y, ...]`` arrays: row ``(x, y, y')`` holds ``table[x, y]`` and
    ``table[x, y']``, in the order of ``pair_weights(...).reshape(-1)``.
    """
    X, Y = table.shape[:2]
    rest = table.shape[2:]
    chosen = jnp.broadcast_to(table[:, :, None], (X, Y, Y, *rest))
    rejected = jnp.broadcast_to(table[:, None, :], (X, Y, Y, *rest))
    return chosen.reshape(-1, *rest), rejected.reshape(-1, *rest)


def pairwise_population_loss(
    per_pair: Callable[..., Array],
    logp: Array,
    ref_logp: Array,
    weights: Array,
    pair_arrays: tuple[Array, ...] = (),
) -> Array:
    """Exact population loss ``Σ_{x,y,y'} w(x,y,y') L(y ≻ y')`` of a pairwise objective.

    Args:
      per_pair: maps ``(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
        *pair_arrays)`` flat ``[N]`` arrays to ``[N]`` losses (see ``per_pair_losses``).
      logp: ``[X, Y]`` the variable table (policy log-probs, or free log-ratios with a
        zero reference).
      ref_logp: ``[X, Y]`` reference log-probs.
      weights: ``[X, Y, Y]`` from ``pair_weights``.
      pair_arrays: further ``[X, Y, Y, ...]`` per-pair inputs (e.g. soft labels), flattened
        to ``[N, ...]`` and passed after the four log-prob arrays.
    """
    chosen, rejected = all_pairs(logp)
    ref_chosen, ref_rejected = all_pairs(ref_logp)
    extras = [a.reshape(-1, *a.shape[3:]) for a in pair_arrays]
    losses = per_pair(chosen, rejected, ref_chosen, ref_rejected, *extras)
    return jnp.sum(weights.reshape(-1) * losses)


def bradley_terry_optimal_difference(
    preference_prob: Array, margin: Array | float = 0.0, label_smoothing: float = 0.0
) -> Array:
    """Score difference ``d* = s(y) − s(y')`` minimising the BT loss on one unordered pair.

    The expected loss over both orientations, with ``p = P(y ≻ y')`` smoothed to
    ``p̃ = (1 − ε)p + ε(1 − p)``, is ``p̃ ℓ(d − m) + (1 − p̃) ℓ(−d − m)``. Setting its
    derivative to zero: ``p̃ σ(m − d) = (1 − p̃) σ(d + m)``. With ``a = eᵈ``, ``b = eᵐ`` this
    is ``p̃ b/(b + a) = (1 − p̃) a b/(1 + a b)``, i.e. the quadratic
    ``(1 − p̃) a² + (1 − 2p̃) b a − p̃ = 0``, whose positive root is
    ``a = [−(1 − 2p̃) b + √((1 − 2p̃)² b² + 4p̃(1 − p̃))] / (2(1 − p̃))``. For m = 0 it gives
    ``d* = logit(p̃)``. A margin pushes the optimum away from zero: the loss asks the
    model for a margin m more than the data supports.
    """
    p = (1.0 - label_smoothing) * preference_prob + label_smoothing * (1.0 - preference_prob)
    b = jnp.exp(jnp.asarray(margin))
    root = (-(1.0 - 2.0 * p) * b + jnp.sqrt((1.0 - 2.0 * p) ** 2 * b**2 + 4.0 * p * (1.0 - p))) / (
        2.0 * (1.0 - p)
    )
    return jnp.log(root)


def conservative_dpo_optimal_margin(preference_prob: Array, label_smoothing: float) -> Array:
    """``β h*`` minimising conservative DPO (label smoothing ε) on one pair.

    Per unordered pair with ``p = P(y ≻ y')`` the expected loss is
    ``p[(1−ε)ℓ(z) + εℓ(−z)] + (1−p)[(1−ε)ℓ(−z) + εℓ(z)] = q ℓ(z) + (1 − q) ℓ(−z)`` with
    ``z = β h`` and ``q = (1 − ε)p + ε(1 − p)``; since ``ℓ'(z) = −σ(−z)`` its derivative
    ``−q σ(−z) + (1 − q) σ(z)`` vanishes at ``σ(z) = q``: ``β h* = logit((1−ε)p + ε(1−p))``.
    Even a deterministic label (p = 1) gives the finite ``log((1 − ε)/ε)``.
    """
    return jax.scipy.special.logit(
        (1.0 - label_smoothing) * preference_prob + label_smoothing * (1.0 - preference_prob)
    )


def robust_dpo_optimal_margin(preference_prob: Array, label_noise: float) -> Array:
    """``β h*`` minimising robust DPO (assumed flip rate ε) on one pair.

    The per-label loss is ``[(1−ε)ℓ(z) − εℓ(−z)]/(1−2ε)``. Over a label that is
    ``y ≻ y'`` with probability p, the weight on ``ℓ(z)`` is
    ``[p(1−ε) − (1−p)ε]/(1−2ε) = (p − ε)/(1 − 2ε) =: q`` and on ``ℓ(−z)`` it is ``1 − q``,
    so as for cDPO the optimum is ``σ(z) = q``: ``β h* = logit((p − ε)/(1 − 2ε))``, finite
    when ``ε < min(p, 1 − p)``. If the observed p came from a clean ``p₀`` by flips at rate
    ε, ``p = (1−ε)p₀ + ε(1−p₀)`` and ``q = p₀``: the noise is undone exactly.
    """
    return jax.scipy.special.logit((preference_prob - label_noise) / (1.0 - 2.0 * label_noise))


def exo_optimal_margin(preference_prob: Array, label_smoothing: float) -> Array:
    """``β h*`` minimising the pairwise EXO loss on one pair.

    With ``q = σ(z)``, the loss for the label ``y ≻ y'`` is ``KL(q ‖ 1 − ε)`` and for the
    reverse label ``KL(q ‖ ε)``. The expected loss is
    ``q log q + (1−q) log(1−q) − q[p log(1−ε) + (1−p) log ε] − (1−q)[p log ε + (1−p) log(1−ε)]``;
    its derivative in z is ``q(1−q)[logit q − (2p − 1) log((1 − ε)/ε)]``, so
    ``β h* = (2p − 1) log((1 − ε)/ε)``: linear in p, unlike the logistic losses.
    """
    return (2.0 * preference_prob - 1.0) * jnp.log((1.0 - label_smoothing) / label_smoothing)


def two_response_optimum(ref_logp: Array, optimal_margin: Array, beta: float) -> Array:
    """``log π*`` on a two-response table whose pair optimum is ``β h* = optimal_margin``.

    ``h = log π(0)/π_ref(0) − log π(1)/π_ref(1)``, so ``π* ∝ π_ref · exp(±h*/2)``.
    """
    half = optimal_margin / (2.0 * beta)
    return core.log_policy(ref_logp + jnp.stack([half, -half], axis=-1))


def ipo_optimum(ref_logp: Array, preference: Array, sampling_logp: Array, beta: float) -> Array:
    """``log π*`` for IPO: ``π*(y) ∝ π_ref(y) exp(P(y ≻ μ)/β)``.

    Azar et al. (2023), "A General Theoretical Paradigm to Understand Learning from Human
    Preferences" (tabular case). The population loss is the least-squares
    problem ``Σ μ(y)μ(y')(g(y) − g(y') − (P(y ≻ y') − 1/2)/β)²`` in ``g = log π/π_ref``;
    its normal equations are ``g(y) − E_μ g = (P(y ≻ μ) − 1/2)/β``.
    """
    return core.log_policy(ref_logp + core.preference_against(preference, sampling_logp) / beta)


def nca_optimal_log_ratio(preference: Array, sampling_logp: Array, beta: float) -> Array:
    """Free log-ratio ``a*(y)`` minimising pairwise NCA: ``β a* = log(2 P(y ≻ μ))``.

    The population loss ``Σ μμP [ℓ(βa_y) + ½ℓ(−βa_y) + ½ℓ(−βa_y')]`` collects, for each
    response y, ``μ(y)[P(y ≻ μ) ℓ(z) + ½ ℓ(−z)]`` (y is chosen with total weight
    ``μ(y)P(y ≻ μ)`` and appears in the ½ℓ(−·) terms with total weight ``μ(y)``). The
    derivative ``−P σ(−z) + ½ σ(z)`` vanishes at ``σ(z) = 2P/(1 + 2P)``, i.e. ``eᶻ = 2P``.
    """
    return jnp.log(2.0 * core.preference_against(preference, sampling_logp)) / beta


def bco_optimal_log_ratio(
    preference: Array, sampling_logp: Array, beta: float, reward_shift: float
) -> Array:
    """Free log-ratio minimising pairwise BCO with fixed shift δ: ``β a* = δ + logit(P(y ≻ μ))``.

    Response y is chosen with weight ``μ(y)P(y ≻ μ)`` (term ``ℓ(z − δ)``) and rejected with
    weight ``μ(y)(1 − P(y ≻ μ))`` (term ``ℓ(δ − z)``): a logistic regression whose optimum
    is ``σ(z − δ) = P(y ≻ μ)``.
    """
    win_rate = core.preference_against(preference, sampling_logp)
    return (reward_shift + jax.scipy.special.logit(win_rate)) / beta


def sppo_hard_optimal_log_ratio(preference: Array, sampling_logp: Array, beta: float) -> Array:
    """Free log-ratio minimising SPPO-hard: ``a*(y) = (P(y ≻ μ) − 1/2)/β``.

    Response y collects ``μ(y)[P (a − 1/(2β))² + (1 − P)(a + 1/(2β))²]`` with
    ``P = P(y ≻ μ)``, minimised at ``a = (2P − 1)/(2β)``: SPPO's soft-label target.
    """
    return (core.preference_against(preference, sampling_logp) - 0.5) / beta


def _inverse_f_derivative(t: np.ndarray, divergence: str, alpha: float) -> np.ndarray:
    """``u = (f')⁻¹(t)`` for the f-divergences of f-DPO (f' up to its additive constant)."""
    if divergence == "reverse_kl":
        return np.exp(t)
    if divergence == "forward_kl":  # f'(u) = −1/u
        return -1.0 / t
    if divergence == "jensen_shannon":  # f'(u) = log(2u/(1 + u))
        e = np.exp(t)
        return e / (2.0 - e)
    if divergence == "alpha":  # f'(u) = (1 − u^{−α})/α
        return (1.0 - alpha * t) ** (-1.0 / alpha)
    raise ValueError(f"unknown divergence {divergence!r}")


_F_DERIVATIVE_SUPREMUM = {
    "reverse_kl": np.inf,
    "forward_kl": 0.0,
    "jensen_shannon": np.log(2.0),
}


def f_divergence_optimum(
    ref_logp: Array,
    reward: Array,
    beta: float,
    divergence: str,
    alpha: float = 0.5,
    *,
    iterations: int = 200,
) -> Array:
    """``log π*`` maximising ``E_π[r] − β D_f(π ‖ π_ref)`` (the f-DPO optimum).

    Stationarity with a normaliser λ(x): ``β f'(π*/π_ref) = r − λ``, so
    ``π* = π_ref (f')⁻¹((r − λ)/β)`` with λ the unique value making it sum to one (the sum
    decreases in λ). λ is found by bisection in float64, inside the range where
    ``(r − λ)/β`` stays below ``sup f'`` (0 for forward KL, log 2 for Jensen–Shannon,
    1/α for the α-divergence). Wang et al. (2023), "Beyond Reverse KL".
    """
    ref = np.exp(np.asarray(ref_logp, np.float64))
    g = np.asarray(reward, np.float64) / beta
    supremum = _F_DERIVATIVE_SUPREMUM.get(divergence, 1.0 / alpha)
    if np.isinf(supremum):
        return core.log_policy(ref_logp + reward / beta)
    low = g.max(axis=-1) - supremum + 1e-12
    high = low + 1.0

    def total(lam: np.ndarray) -> np.ndarray:
        return np.sum(ref * _inverse_f_derivative(g - lam[:, None], divergence, alpha), -1)

    while np.any(total(high) > 1.0):
        high = np.where(total(high) > 1.0, high + 2.0 * (high - low), high)
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        too_big = total(middle) > 1.0
        low, high = np.where(too_big, middle, low), np.where(too_big, high, middle)
    lam = 0.5 * (low + high)
    u = _inverse_f_derivative(g - lam[:, None], divergence, alpha)
    return jnp.asarray(np.log(ref * u), jnp.float32)


def plackett_luce_rankings(scores: Array) -> tuple[Array, Array]:
    """All rankings of the K responses and their Plackett–Luce probabilities.

    ``P(σ) = Π_i exp s_σ(i) / Σ_{j ≥ i} exp s_σ(j)``.

    Returns:
      ``(rankings [K!, K], probs [X, K!])``: each ranking lists responses best first.
    """
    K = scores.shape[-1]
    rankings = jnp.asarray(list(itertools.permutations(range(K))))
    ranked = scores[:, rankings]  # [X, K!, K]
    tail = jax.lax.cumlogsumexp(ranked, axis=ranked.ndim - 1, reverse=True)
    return rankings, jnp.exp(jnp.sum(ranked - tail, axis=-1))
