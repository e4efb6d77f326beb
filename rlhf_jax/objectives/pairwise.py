"""Pairwise direct-alignment losses: DPO and its family, under one signature.

Every loss here has the signature::

    fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
       *, chosen_lengths=None, rejected_lengths=None, reduction="mean", **hyper)
    -> (loss, metrics)

where each log-prob is the ``[B]`` per-sequence sum of token log-probabilities, the
lengths are ``[B]`` token counts (needed only by the length-normalised losses), and the
hyper-parameters are keywords. A training config selects a loss by its name in
``PAIRWISE_LOSSES`` and passes its hyper-parameters; ``weighted_sum`` builds a loss that is
a weighted sum of several named ones. Reference-free losses (SimPO, CPO, ORPO) accept and
ignore the reference log-probs so that the signature stays uniform.

Notation: ``a_w = log π(y_w)/π_ref(y_w)`` and ``a_l = log π(y_l)/π_ref(y_l)`` are the
chosen and rejected log-ratios, ``h = a_w − a_l`` their difference, and
``ℓ(z) = −log σ(z)`` the logistic loss. Metrics report the implicit rewards ``β·a`` of the
chosen and rejected responses, their margin and the reward accuracy (the fraction of pairs
whose chosen implicit reward is the larger), each averaged over the batch, and
``"denominator"`` (the number of pairs) for gradient accumulation with ``reduction="sum"``.
For the reference-free losses the reported "rewards" are the quantities they compare
(SimPO: ``β log π/|y|``; CPO: ``β log π``; ORPO: ``log π/|y|``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
from jax import Array

from rlhf_jax.objectives.links import logistic_loss
from rlhf_jax.objectives.reduction import Reduction, reduce_loss

PairwiseLoss = Callable[..., tuple[Array, dict[str, Array]]]

F_DIVERGENCES = ("reverse_kl", "forward_kl", "jensen_shannon", "alpha")


def _check_pairs(*arrays: Array | None) -> None:
    present = [a for a in arrays if a is not None]
    chex.assert_rank(present, 1)
    chex.assert_equal_shape(present)


def _require_lengths(name: str, chosen_lengths: Array | None, rejected_lengths: Array | None):
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError(f"{name} needs chosen_lengths and rejected_lengths ([B] token counts)")
    return chosen_lengths, rejected_lengths


def _per_token(logps: Array, lengths: Array) -> Array:
    return logps / jnp.maximum(lengths.astype(logps.dtype), 1.0)


def _finish(
    per_pair: Array,
    chosen_rewards: Array,
    rejected_rewards: Array,
    reduction: Reduction,
    **extra: Array,
) -> tuple[Array, dict[str, Array]]:
    """Reduce per-pair losses and gather the diagnostics every pairwise loss reports."""
    loss, denominator = reduce_loss(per_pair, reduction=reduction)
    chosen_rewards = jax.lax.stop_gradient(chosen_rewards)
    rejected_rewards = jax.lax.stop_gradient(rejected_rewards)
    margin = chosen_rewards - rejected_rewards
    metrics = {
        "denominator": denominator,
        "chosen_rewards": jnp.mean(chosen_rewards),
        "rejected_rewards": jnp.mean(rejected_rewards),
        "reward_margin": jnp.mean(margin),
        "reward_accuracy": jnp.mean((margin > 0).astype(per_pair.dtype)),
    }
    metrics.update(extra)
    return loss, metrics


def dpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    reduction: Reduction = "mean",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
    """DPO (sigmoid) loss, with conservative DPO's label smoothing ε.

    ``L = (1 − ε) ℓ(β h) + ε ℓ(−β h)``: Rafailov et al. (2023), eq. 7, for ε = 0; with
    ε > 0 it is conservative DPO (Mitchell, 2023, "A note on DPO with noisy preferences"),
    the cross-entropy against labels flipped with probability ε, whose optimum is finite
    even for deterministic preferences.
    """
    del chosen_lengths, rejected_lengths
    _check_pairs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    a_w = policy_chosen_logps - ref_chosen_logps
    a_l = policy_rejected_logps - ref_rejected_logps
    logits = beta * (a_w - a_l)
    per_pair = (1.0 - label_smoothing) * logistic_loss(logits) + label_smoothing * logistic_loss(
        -logits
    )
    return _finish(per_pair, beta * a_w, beta * a_l, reduction)


def robust_dpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    reduction: Reduction = "mean",
    beta: float = 0.1,
    label_noise: float = 0.1,
) -> tuple[Array, dict[str, Array]]:
    """Robust DPO: the unbiased loss under labels flipped with probability ε < 1/2.

    ``L = [(1 − ε) ℓ(β h) − ε ℓ(−β h)] / (1 − 2ε)`` (Chowdhury, Kini & Natarajan, 2024,
    "Provably Robust DPO"). Its expectation over the noisy label equals the clean
    DPO loss, so on data whose labels were flipped at rate ε it has DPO's clean optimum.
    """
    del chosen_lengths, rejected_lengths
    _check_pairs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    a_w = policy_chosen_logps - ref_chosen_logps
    a_l = policy_rejected_logps - ref_rejected_logps
    logits = beta * (a_w - a_l)
    per_pair = (
        (1.0 - label_noise) * logistic_loss(logits) - label_noise * logistic_loss(-logits)
    ) / (1.0 - 2.0 * label_noise)
    return _finish(per_pair, beta * a_w, beta * a_l, reduction)


def ipo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    reduction: Reduction = "mean",
    beta: float = 0.1,
    preference_probs: Array | None = None,
    length_normalise: bool = False,
) -> tuple[Array, dict[str, Array]]:
    """IPO: squared regression of the log-ratio difference on the preference.

    ``L = (h − (p − 1/2)/β)²`` with ``p = P(y_w ≻ y_l)`` (default 1, a hard label, giving
    Azar et al. (2023), ``(h − 1/(2β))²``; β is the paper's τ). With soft labels
    ``p`` from a preference model this is the online-IPO / IPO-MD regression target: the
    expectation of the hard-label loss over the label ``Bernoulli(p)`` equals this loss up
    to a constant. Its population minimiser over pairs ``y, y' ∼ μ`` is
    ``π*(y) ∝ π_ref(y) exp(P(y ≻ μ)/β)`` (Azar et al., 2023, tabular case).

    The log-ratios are summed over tokens by default, because the theory (the optimum
    above) is a statement about sequence probabilities; ``length_normalise=True`` divides
    each log-ratio by its response length (the per-token average used in some released
    code), which changes the optimum to one over per-token log-ratios.
    """
    _check_pairs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    a_w = policy_chosen_logps - ref_chosen_logps
    a_l = policy_rejected_logps - ref_rejected_logps
    if length_normalise:
        chosen_lengths, rejected_lengths = _require_lengths(
            "ipo_loss(length_normalise=True)", chosen_lengths, rejected_lengths
        )
        _check_pairs(a_w, chosen_lengths, rejected_lengths)
        a_w, a_l = _per_token(a_w, chosen_lengths), _per_token(a_l, rejected_lengths)
    if preference_probs is None:
        preference_probs = jnp.ones_like(a_w)
    _check_pairs(a_w, preference_probs)
    target = (preference_probs - 0.5) / beta
    per_pair = (a_w - a_l - target) ** 2
    return _finish(per_pair, beta * a_w, beta * a_l, reduction)


def slic_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    reduction: Reduction = "mean",
    beta: float = 0.1,
    margin: float = 1.0,
) -> tuple[Array, dict[str, Array]]:
    """SLiC hinge calibration loss ``L = max(0, δ − β h)``.

    Zhao et al. (2023), "SLiC-HF", calibration loss, with the log-likelihoods normalised by the
    reference as in Liu et al. (2024), "Statistical rejection sampling" (RSO, hinge loss);
    pass zero reference log-probs for the unnormalised original. Zero loss and zero
    gradient once the margin δ is reached.
    """
    del chosen_lengths, rejected_lengths
    _check_pairs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    a_w = policy_chosen_logps - ref_chosen_logps
    a_l = policy_rejected_logps - ref_rejected_logps
    per_pair = jax.nn.relu(margin - beta * (a_w - a_l))
    return _finish(per_pair, beta * a_w, beta * a_l, reduction)


def exo_pair_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    reduction: Reduction = "mean",
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
) -> tuple[Array, dict[str, Array]]:
    """EXO for pairs: reverse KL from the model's pair distribution to the smoothed label.

    ``L = KL(Bern(σ(β h)) ‖ Bern(1 − ε)) = σ(βh)[log σ(βh) − log(1 − ε)]
    + σ(−βh)[log σ(−βh) − log ε]`` (Ji et al., 2024, "Towards Efficient Exact
    Optimization of Language Model Alignment", with K = 2 and the label
    distribution smoothed by ε > 0). Zero exactly at ``β h = log((1 − ε)/ε)``.
    """
    del chosen_lengths, rejected_lengths
    _check_pairs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    a_w = policy_chosen_logps - ref_chosen_logps
    a_l = policy_rejected_logps - ref_rejected_logps
    logits = beta * (a_w - a_l)
    log_p, log_q = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
    per_pair = jnp.exp(log_p) * (log_p - jnp.log1p(-label_smoothing)) + jnp.exp(log_q) * (
        log_q - jnp.log(label_smoothing)
    )
    return _finish(per_pair, beta * a_w, beta * a_l, reduction)


def nca_pair_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    reduction: Reduction = "mean",
    beta: float = 0.1,
) -> tuple[Array, dict[str, Array]]:
    """NCA for pairs: ``L = ℓ(β a_w) + ½ ℓ(−β a_w) + ½ ℓ(−β a_l)``.

    Chen et al. (2024), "Noise Contrastive Alignment of Language Models with Explicit
    Rewards", pairwise NCA (K = 2 and a hard label). Unlike DPO it is not
    invariant to a common shift of both log-ratios: it fits the absolute implicit reward,
    whose population optimum on pairs drawn from μ is ``β a*(y) = log(2 P(y ≻ μ))``.
    """
    del chosen_lengths, rejected_lengths
    _check_pairs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    r_w = beta * (policy_chosen_logps - ref_chosen_logps)
    r_l = beta * (policy_rejected_logps - ref_rejected_logps)
    per_pair = logistic_loss(r_w) + 0.5 * logistic_loss(-r_w) + 0.5 * logistic_loss(-r_l)
    return _finish(per_pair, r_w, r_l, reduction)


def bco_pair_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    reduction: Reduction = "mean",
    beta: float = 0.1,
    reward_shift: Array | float = 0.0,
    shift_decay: float = 0.99,
) -> tuple[Array, dict[str, Array]]:
    """BCO on pairs: a binary classifier with logit ``β a − δ``.

    ``L = ℓ(β a_w − δ) + ℓ(−(β a_l − δ))`` (Jung et al., 2024, "Binary Classifier
    Optimization", applied to both members of a pair). The shift δ is a running mean
    of the implicit rewards; it is state, passed in as ``reward_shift`` and held fixed in
    the loss (so micro-batches of one step see the same δ), and its update
    ``δ' = d·δ + (1 − d)·mean(β a_w, β a_l)`` is returned as ``metrics["reward_shift"]``.
    """
    del chosen_lengths, rejected_lengths
    _check_pairs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    r_w = beta * (policy_chosen_logps - ref_chosen_logps)
    r_l = beta * (policy_rejected_logps - ref_rejected_logps)
    shift = jax.lax.stop_gradient(jnp.asarray(reward_shift, r_w.dtype))
    per_pair = logistic_loss(r_w - shift) + logistic_loss(-(r_l - shift))
    batch_mean = jax.lax.stop_gradient(0.5 * (jnp.mean(r_w) + jnp.mean(r_l)))
    new_shift = shift_decay * shift + (1.0 - shift_decay) * batch_mean
    return _finish(per_pair, r_w, r_l, reduction, reward_shift=new_shift)


def sppo_hard_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    reduction: Reduction = "mean",
    beta: float = 0.1,
) -> tuple[Array, dict[str, Array]]:
    """SPPO with hard win-rate labels: ``L = (a_w − 1/(2β))² + (a_l + 1/(2β))²``.

    Wu et al. (2024), "Self-Play Preference Optimization", with the estimated win
    rates replaced by the labels 1 and 0 and η = 1/β; the reference is the previous
    iterate π_t. On pairs from μ its population optimum is
    ``a*(y) = (P(y ≻ μ) − 1/2)/β``, SPPO's soft target.
    """
    del chosen_lengths, rejected_lengths
    _check_pairs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    a_w = policy_chosen_logps - ref_chosen_logps
    a_l = policy_rejected_logps - ref_rejected_logps
    per_pair = (a_w - 0.5 / beta) ** 2 + (a_l + 0.5 / beta) ** 2
    return _finish(per_pair, beta * a_w, beta * a_l, reduction)


def aot_pair_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    reduction: Reduction = "mean",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
    """AOT, paired: distributional dominance of the policy's margin over the reference's.

    Melnyk et al. (2024), "Distributional Preference Alignment of LLMs via Optimal
    Transport", paired setting: with ``u = log π(y_w)/π(y_l)`` and
    ``v = log π_ref(y_w)/π_ref(y_l)`` over the batch, the one-dimensional optimal
    transport between their empirical distributions matches sorted values, and
    ``L = Σ_i (1 − ε) ℓ(β(u_(i) − v_(i))) + ε ℓ(−β(u_(i) − v_(i)))``. The loss depends on the
    batch through the sort, so it does not decompose over micro-batches; with a batch of
    one it is DPO.
    """
    del chosen_lengths, rejected_lengths
    _check_pairs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    policy_margin = jnp.sort(policy_chosen_logps - policy_rejected_logps)
    ref_margin = jnp.sort(ref_chosen_logps - ref_rejected_logps)
    logits = beta * (policy_margin - ref_margin)
    per_pair = (1.0 - label_smoothing) * logistic_loss(logits) + label_smoothing * logistic_loss(
        -logits
    )
    a_w = policy_chosen_logps - ref_chosen_logps
    a_l = policy_rejected_logps - ref_rejected_logps
    return _finish(per_pair, beta * a_w, beta * a_l, reduction)


def apo_zero_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    reduction: Reduction = "mean",
    beta: float = 0.1,
) -> tuple[Array, dict[str, Array]]:
    """APO-zero: ``L = 1 − σ(β a_w) + σ(β a_l)``.

    D'Oosterlinck et al. (2024), "Anchored Preference Optimization": anchored at
    the reference, it always raises the chosen likelihood and lowers the rejected one
    (for when the chosen responses are better than the model's).
    """
    del chosen_lengths, rejected_lengths
    _check_pairs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    r_w = beta * (policy_chosen_logps - ref_chosen_logps)
    r_l = beta * (policy_rejected_logps - ref_rejected_logps)
    per_pair = 1.0 - jax.nn.sigmoid(r_w) + jax.nn.sigmoid(r_l)
    return _finish(per_pair, r_w, r_l, reduction)


def apo_down_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    reduction: Reduction = "mean",
    beta: float = 0.1,
) -> tuple[Array, dict[str, Array]]:
    """APO-down: ``L = σ(β a_w) + 1 − σ(β a_w − β a_l)``.

    D'Oosterlinck et al. (2024): lowers the total likelihood of the pair while
    keeping the chosen above the rejected (for when the model is better than the chosen).
    """
    del chosen_lengths, rejected_lengths
    _check_pairs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    r_w = beta * (policy_chosen_logps - ref_chosen_logps)
    r_l = beta * (policy_rejected_logps - ref_rejected_logps)
    per_pair = jax.nn.sigmoid(r_w) + 1.0 - jax.nn.sigmoid(r_w - r_l)
    return _finish(per_pair, r_w, r_l, reduction)


def discopop_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    reduction: Reduction = "mean",
    beta: float = 0.05,
    temperature: float = 0.05,
) -> tuple[Array, dict[str, Array]]:
    """DiscoPOP (log-ratio modulated loss): a blend of the logistic and exponential losses.

    With ``z = β h`` and ``m = σ(z/τ)``: ``L = (1 − m) ℓ(z) + m exp(−z)`` (Chris Lu et al.,
    2024, "Discovering Preference Optimization Algorithms with and for Large Language
    Models", the LRML objective). For ``z ≪ −τ`` it is DPO's logistic loss, for
    ``z ≫ τ`` the exponential loss.
    """
    del chosen_lengths, rejected_lengths
    _check_pairs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    a_w = policy_chosen_logps - ref_chosen_logps
    a_l = policy_rejected_logps - ref_rejected_logps
    logits = beta * (a_w - a_l)
    modulation = jax.nn.sigmoid(logits / temperature)
    per_pair = (1.0 - modulation) * logistic_loss(logits) + modulation * jnp.exp(-logits)
    return _finish(per_pair, beta * a_w, beta * a_l, reduction)


def simpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    reduction: Reduction = "mean",
    beta: float = 2.0,
    target_margin: float = 0.5,
) -> tuple[Array, dict[str, Array]]:
    """SimPO: length-normalised, reference-free, with a target margin γ.

    ``L = ℓ(β log π(y_w)/|y_w| − β log π(y_l)/|y_l| − γ)`` (Meng, Xia & Chen, 2024,
    "SimPO", eq. 6). The reference log-probs are ignored.
    """
    del ref_chosen_logps, ref_rejected_logps
    chosen_lengths, rejected_lengths = _require_lengths(
        "simpo_loss", chosen_lengths, rejected_lengths
    )
    _check_pairs(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)
    r_w = beta * _per_token(policy_chosen_logps, chosen_lengths)
    r_l = beta * _per_token(policy_rejected_logps, rejected_lengths)
    per_pair = logistic_loss(r_w - r_l - target_margin)
    return _finish(per_pair, r_w, r_l, reduction)


def cpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    reduction: Reduction = "mean",
    beta: float = 0.1,
    nll_weight: float = 1.0,
    label_smoothing: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
    """CPO: reference-free DPO plus a negative log-likelihood term on the chosen response.

    ``L = (1 − ε) ℓ(β(log π(y_w) − log π(y_l))) + ε ℓ(−…) − λ log π(y_w)/|y_w|``
    (Xu et al., 2024, "Contrastive Preference Optimization"; the NLL term is per
    token when lengths are given, per sequence otherwise). The reference is ignored.
    """
    del ref_chosen_logps, ref_rejected_logps
    _check_pairs(policy_chosen_logps, policy_rejected_logps, chosen_lengths)
    r_w, r_l = beta * policy_chosen_logps, beta * policy_rejected_logps
    logits = r_w - r_l
    preference = (1.0 - label_smoothing) * logistic_loss(logits) + label_smoothing * logistic_loss(
        -logits
    )
    chosen = policy_chosen_logps
    if chosen_lengths is not None:
        chosen = _per_token(chosen, chosen_lengths)
    nll = -chosen
    per_pair = preference + nll_weight * nll
    return _finish(
        per_pair, r_w, r_l, reduction, preference_loss=jnp.mean(preference), nll=jnp.mean(nll)
    )


def orpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    reduction: Reduction = "mean",
    odds_ratio_weight: float = 0.1,
) -> tuple[Array, dict[str, Array]]:
    """ORPO: per-token NLL of the chosen response plus a log-odds-ratio penalty.

    With ``p(y) = exp(log π(y)/|y|)`` the per-token average likelihood and
    ``odds(y) = p/(1 − p)``: ``L = −log p(y_w) + λ ℓ(log odds(y_w) − log odds(y_l))``
    (Hong, Lee & Thorne, 2024, "ORPO"). The reference is ignored. The log odds
    is computed stably as ``log p − log(1 − p)`` with ``log(1 − p) = log1p(−exp(log p))``.
    """
    del ref_chosen_logps, ref_rejected_logps
    chosen_lengths, rejected_lengths = _require_lengths(
        "orpo_loss", chosen_lengths, rejected_lengths
    )
    _check_pairs(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)
    mean_w = _per_token(policy_chosen_logps, chosen_lengths)
    mean_l = _per_token(policy_rejected_logps, rejected_lengths)
    log_odds_ratio = (mean_w - jnp.log1p(-jnp.exp(mean_w))) - (mean_l - jnp.log1p(-jnp.exp(mean_l)))
    odds_ratio_term = logistic_loss(log_odds_ratio)
    per_pair = -mean_w + odds_ratio_weight * odds_ratio_term
    return _finish(
        per_pair,
        mean_w,
        mean_l,
        reduction,
        log_odds_ratio=jnp.mean(jax.lax.stop_gradient(log_odds_ratio)),
        odds_ratio_loss=jnp.mean(odds_ratio_term),
        nll=jnp.mean(-mean_w),
    )


def f_divergence_derivative(log_ratio: Array, divergence: str, alpha: float = 0.5) -> Array:
    """``f'(u)`` at ``u = π/π_ref``, from ``log u``, up to an additive constant.

    reverse KL ``f(u) = u log u``: ``log u``; forward KL ``f(u) = −log u``: ``−1/u``;
    Jensen–Shannon ``f(u) = u log u − (1 + u) log((1 + u)/2)``: ``log(2u/(1 + u))``;
    α-divergence ``f(u) = (u^{1−α} − (1 − α)u − α)/(α(α − 1))``: ``(1 − u^{−α})/α``.
    Wang et al. (2023), "Beyond Reverse KL".
    """
    if divergence == "reverse_kl":
        return log_ratio
    if divergence == "forward_kl":
        return -jnp.exp(-log_ratio)
    if divergence == "jensen_shannon":
        return jnp.log(2.0) + jax.nn.log_sigmoid(log_ratio)
    if divergence == "alpha":
        return -jnp.expm1(-alpha * log_ratio) / alpha
    raise ValueError(f"divergence must be one of {F_DIVERGENCES}, got {divergence!r}")


def f_dpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    reduction: Reduction = "mean",
    beta: float = 0.1,
    divergence: str = "reverse_kl",
    alpha: float = 0.5,
) -> tuple[Array, dict[str, Array]]:
    """f-DPO: DPO with the KL regulariser replaced by an f-divergence.

    ``L = ℓ(β f'(π(y_w)/π_ref(y_w)) − β f'(π(y_l)/π_ref(y_l)))`` (Wang et al., 2023,
    "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
    Divergence Constraints"). Reverse KL is DPO. The population optimum satisfies
    ``β f'(π*/π_ref) = r − λ(x)``, with λ the normaliser.
    """
    del chosen_lengths, rejected_lengths
    _check_pairs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    a_w = policy_chosen_logps - ref_chosen_logps
    a_l = policy_rejected_logps - ref_rejected_logps
    r_w = beta * f_divergence_derivative(a_w, divergence, alpha)
    r_l = beta * f_divergence_derivative(a_l, divergence, alpha)
    return _finish(logistic_loss(r_w - r_l), r_w, r_l, reduction)


PAIRWISE_LOSSES: dict[str, PairwiseLoss] = {
    "dpo": dpo_loss,
    "robust_dpo": robust_dpo_loss,
    "ipo": ipo_loss,
    "slic": slic_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "aot_pair": aot_pair_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "simpo": simpo_loss,
    "cpo": cpo_loss,
    "orpo": orpo_loss,
    "f_dpo": f_dpo_loss,
}


def weighted_sum(components: Sequence[tuple[str, float, Mapping[str, Any]]]) -> PairwiseLoss:
    """A pairwise loss ``Σ_k w_k · loss_k`` of named losses with their own hyper-parameters.

    Args:
      components: ``(name, weight, hyper)`` triples; ``name`` is a key of
        ``PAIRWISE_LOSSES`` and ``hyper`` its keyword hyper-parameters, e.g.
        ``[("dpo", 1.0, {"beta": 0.1}), ("sppo_hard", 0.5, {"beta": 0.1})]``.

    Returns:
      A loss with the uniform pairwise signature. Its metrics are the first component's
      diagnostics, ``"denominator"``, and each component's loss and metrics prefixed by
      ``"<k>_<name>/"``.
    """
    for name, _, _ in components:
        if name not in PAIRWISE_LOSSES:
            raise ValueError(f"unknown pairwise loss {name!r}; known: {sorted(PAIRWISE_LOSSES)}")
    if not components:
        raise ValueError("weighted_sum needs at least one component")

    def loss_fn(
        policy_chosen_logps: Array,
        policy_rejected_logps: Array,
        ref_chosen_logps: Array,
        ref_rejected_logps: Array,
        *,
        chosen_lengths: Array | None = None,
        rejected_lengths: Array | None = None,
        reduction: Reduction = "mean",
    ) -> tuple[Array, dict[str, Array]]:
        total = jnp.zeros(())
        metrics: dict[str, Array] = {}
        for k, (name, weight, hyper) in enumerate(components):
            loss, part = PAIRWISE_LOSSES[name](
                policy_chosen_logps,
                policy_rejected_logps,
                ref_chosen_logps,
                ref_rejected_logps,
                chosen_lengths=chosen_lengths,
                rejected_lengths=rejected_lengths,
                reduction=reduction,
                **hyper,
            )
            total = total + weight * loss
            if k == 0:
                metrics.update(part)
            metrics[f"{k}_{name}/loss"] = loss
            metrics.update({f"{k}_{name}/{key}": value for key, value in part.items()})
        return total, metrics

    return loss_fn
