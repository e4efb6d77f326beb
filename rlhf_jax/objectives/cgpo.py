"""CGPO: constrained RLHF with a mixture of judges (CRPG, CRRAFT, CODPO).

Xu et al. (2024), "The Perfect Blend: Redefining RLHF with Mixture of Judges", §4.
Each constraint is checked by a judge, a function from a generation (the prompt and the
response, or arrays computed from them) to a boolean "violates" flag: rule-based judges
(length limits, banned tokens, failed unit tests or format checks) or model-based ones
(an LLM or classifier whose violation score exceeds a threshold). A mixture of judges
flags a sample when any judge does; the unflagged samples form the feasible region
``Σ``, and ``ψ(s, a) = 1[(s, a) ∈ Σ]``. The three constrained optimisers use the flags
as follows:

- CRPG (calibrated-regularised policy gradient, §4.1): the reward is calibrated against
  a baseline response ``ā`` of the same prompt, ``R_calib(s, a) = σ(r(s, a) − r(s, ā))``
  (in ``(0, 1)``, comparable across prompts), and the update is
  ``g = (1/|B|) Σ ψ(s, a) R_calib(s, a) ∇ log π(a|s)``: a flagged sample contributes
  nothing, i.e. its reward is set to 0, the lowest calibrated reward. (The KL
  regularisation of the paper's name is the caller's, e.g. a penalty in the reward or
  a bounded number of steps from the reference.)
- CRRAFT (constrained RAFT, §4.1): reward-ranked fine-tuning on the best unflagged
  sample of each prompt (``raft.raft_loss`` restricted to ``Σ``); ``sample_weights``
  optionally reweights the kept samples, e.g. by their calibrated rewards.
- CODPO (constrained online DPO, §4.1): from the samples of each prompt the chosen
  response is the highest-reward unflagged one and the rejected response the
  lowest-ranked other one, where flagged samples rank below every unflagged one (the
  rejected response may be flagged, the chosen never is). The loss is DPO plus a
  length-normalised NLL of the chosen response,
  ``ℓ = −log σ(β (log π(a⁺)/π_ref(a⁺) − log π(a⁻)/π_ref(a⁻))) − λ log π(a⁺) / |a⁺|``.

With every judge passing, CRPG is the plain policy gradient with the calibrated reward,
CRRAFT is ``raft.raft_loss`` and CODPO is ``pairwise.dpo_loss`` plus the NLL term.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
from jax import Array

from rlhf_jax.objectives.raft import best_of_n_mask, raft_loss
from rlhf_jax.objectives.reduction import Reduction, reduce_loss
from rlhf_jax.objectives.sft import Normalisation

#: A judge maps a generation (e.g. ``(prompt, response)`` or arrays such as tokens, masks
#: or scores) to a boolean "violates the constraint" flag (scalar or batched).
Judge = Callable[..., Array]


def mixture_of_judges(judges: Sequence[Judge]) -> Judge:
    """A judge that flags a generation when any of ``judges`` does (same call signature).

    Args:
      judges: judges taking the same arguments.

    Returns:
      ``judge(*args, **kwargs) -> any_k judges[k](*args, **kwargs)``.
    """
    if not judges:
        raise ValueError("a mixture of judges needs at least one judge")

    def judge(*args, **kwargs) -> Array:
        flags = [jnp.asarray(j(*args, **kwargs), dtype=bool) for j in judges]
        return jnp.any(jnp.stack(jnp.broadcast_arrays(*flags)), axis=0)

    return judge


def length_violation(mask: Array, *, max_tokens: int) -> Array:
    """Rule-based judge: the response has more than ``max_tokens`` tokens. ``[B, T] -> [B]``."""
    chex.assert_rank(mask, 2)
    return jnp.sum(mask > 0, axis=-1) > max_tokens


def banned_token_violation(tokens: Array, mask: Array, *, banned_ids: Sequence[int]) -> Array:
    """Rule-based judge: a response token is one of ``banned_ids``. ``[B, T] -> [B]``."""
    chex.assert_rank([tokens, mask], 2)
    chex.assert_equal_shape([tokens, mask])
    banned = jnp.isin(tokens, jnp.asarray(banned_ids, tokens.dtype))
    return jnp.any(banned & (mask > 0), axis=-1)


def score_violation(scores: Array, *, threshold: float) -> Array:
    """Model-based judge: a judge model's violation score (e.g. P(unsafe)) exceeds ``threshold``."""
    return scores > threshold


def calibrated_reward(rewards: Array, baseline_rewards: Array) -> Array:
    """``R_calib = σ(r(s, a) − r(s, ā))`` against a baseline response ā (Xu et al., 2024, §4.1).

    Args:
      rewards: ``[B]`` or ``[P, n]`` rewards of the samples.
      baseline_rewards: rewards of each prompt's baseline response, broadcastable to
        ``rewards`` (``[B]``, or ``[P, 1]`` for n samples per prompt).

    Returns:
      Calibrated rewards in ``(0, 1)``, shaped like ``rewards``.
    """
    return jax.nn.sigmoid(rewards - baseline_rewards)


def crpg_loss(
    logps: Array,
    calibrated_rewards: Array,
    violations: Array,
    *,
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """CRPG surrogate ``−(1/|B|) Σ ψ R_calib log π(a|s)`` (Xu et al., 2024, §4.1).

    Its gradient is minus the CRPG update ``Σ ψ R_calib ∇ log π``; flagged samples
    (``ψ = 0``) get no weight. With no flags it is the REINFORCE surrogate of the
    calibrated reward.

    Args:
      logps: ``[B]`` sequence log-probabilities log π_θ(a|s) (differentiated).
      calibrated_rewards: ``[B]`` R_calib (constant).
      violations: ``[B]`` bool, True where any judge flags the sample.
      reduction: ``"mean"`` (over all B samples, flagged ones included, as the update's
        ``1/|B|``) or ``"sum"``.

    Returns:
      ``(loss, metrics)`` with ``denominator``, ``violation_rate`` and
      ``feasible_reward`` (mean calibrated reward of the unflagged samples).
    """
    chex.assert_rank(logps, 1)
    chex.assert_equal_shape([logps, calibrated_rewards, violations])
    feasible = jnp.logical_not(violations).astype(logps.dtype)
    weights = jax.lax.stop_gradient(calibrated_rewards) * feasible
    loss, denominator = reduce_loss(-weights * logps, reduction=reduction)
    metrics = {
        "denominator": denominator,
        "violation_rate": 1.0 - jnp.mean(feasible),
        "feasible_reward": jnp.sum(weights) / jnp.maximum(jnp.sum(feasible), 1.0),
    }
    return loss, metrics


def crraft_loss(
    token_logps: Array,
    token_mask: Array,
    rewards: Array,
    violations: Array,
    *,
    sample_weights: Array | None = None,
    normalisation: Normalisation = "token",
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """CRRAFT: SFT on each prompt's best unflagged sample (Xu et al., 2024, §4.1).

    ``raft.raft_loss`` with local (best-of-n) ranking restricted to the samples no judge
    flags; a prompt whose samples are all flagged contributes nothing.

    Args:
      token_logps: ``[P, n, T]`` token log-probs of every sample.
      token_mask: ``[P, n, T]`` response masks.
      rewards: ``[P, n]`` rewards (raw or calibrated: the ranking is the same).
      violations: ``[P, n]`` bool flags.
      sample_weights: optional ``[P, n]`` non-negative weights of the kept samples' token
        losses, e.g. their calibrated rewards; None weighs them equally.
      normalisation: ``"token"`` or ``"sequence"``, as in ``sft.sft_loss``.
      reduction: ``"mean"`` or ``"sum"``.

    Returns:
      ``raft_loss``'s ``(loss, metrics)`` plus ``violation_rate``.
    """
    chex.assert_rank([token_logps, rewards, violations], [3, 2, 2])
    chex.assert_equal_shape([rewards, violations])
    if sample_weights is not None:
        chex.assert_equal_shape([rewards, sample_weights])
        token_mask = token_mask * jax.lax.stop_gradient(sample_weights)[..., None]
    feasible = jnp.logical_not(violations).astype(rewards.dtype)
    loss, metrics = raft_loss(
        token_logps,
        token_mask,
        rewards,
        valid=feasible,
        normalisation=normalisation,
        reduction=reduction,
    )
    return loss, {**metrics, "violation_rate": 1.0 - jnp.mean(feasible)}


def codpo_pairs(rewards: Array, violations: Array) -> tuple[Array, Array, Array]:
    """CODPO pair selection among n samples per prompt (Xu et al., 2024, §4.1).

    Chosen: the highest-reward unflagged sample. Rejected: the lowest-ranked other
    sample, ranking flagged samples below all unflagged ones (among flagged samples,
    and among unflagged ones, by reward). Ties go to the lowest index.

    Args:
      rewards: ``[P, n]`` rewards, ``n ≥ 2``.
      violations: ``[P, n]`` bool flags.

    Returns:
      ``(chosen, rejected, valid)``: int32 ``[P]`` sample indices and a ``[P]`` bool that
      is False where every sample is flagged (no admissible chosen response).
    """
    chex.assert_rank([rewards, violations], 2)
    chex.assert_equal_shape([rewards, violations])
    if rewards.shape[1] < 2:
        raise ValueError(f"CODPO needs at least 2 samples per prompt, got rewards {rewards.shape}")
    flagged = violations.astype(bool)
    chosen_mask = best_of_n_mask(rewards, jnp.logical_not(flagged))
    chosen = jnp.argmax(chosen_mask, axis=1).astype(jnp.int32)
    valid = jnp.any(jnp.logical_not(flagged), axis=1)
    # Rank key: flagged samples below every unflagged one; the chosen sample is excluded.
    spread = jnp.max(rewards, axis=1, keepdims=True) - jnp.min(rewards, axis=1, keepdims=True)
    key = jnp.where(flagged, rewards - 2.0 * spread - 1.0, rewards)
    key = jnp.where(chosen_mask > 0, jnp.inf, key)
    rejected = jnp.argmin(key, axis=1).astype(jnp.int32)
    return chosen, rejected, valid


def select_samples(values: Array, index: Array) -> Array:
    """``values[p, index[p], ...]``: pick one sample per prompt from ``[P, n, ...]`` arrays."""
    chex.assert_rank(index, 1)
    chex.assert_equal_shape_prefix([values, index], 1)
    expanded = index.reshape(index.shape + (1,) * (values.ndim - 1))
    return jnp.take_along_axis(values, expanded, axis=1)[:, 0]


def codpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    chosen_lengths: Array,
    *,
    valid: Array | None = None,
    beta: float = 0.1,
    nll_coef: float = 1.0,
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """CODPO loss ``−log σ(β h) − λ log π(a⁺)/|a⁺|`` on constraint-aware pairs (§4.1).

    ``h = log π(a⁺)/π_ref(a⁺) − log π(a⁻)/π_ref(a⁻)``; the pairs come from
    :func:`codpo_pairs` (and :func:`select_samples`).

    Args:
      policy_chosen_logps: ``[B]`` log π_θ(a⁺|s) (sequence sums).
      policy_rejected_logps: ``[B]`` log π_θ(a⁻|s).
      ref_chosen_logps: ``[B]`` log π_ref(a⁺|s).
      ref_rejected_logps: ``[B]`` log π_ref(a⁻|s).
      chosen_lengths: ``[B]`` token counts |a⁺|.
      valid: optional ``[B]`` mask of usable pairs (``codpo_pairs``' third output).
      beta: β.
      nll_coef: λ, the weight of the chosen response's per-token NLL.
      reduction: ``"mean"`` (over valid pairs) or ``"sum"``.

    Returns:
      ``(loss, metrics)`` with ``denominator``, ``dpo_loss``, ``nll`` (per-pair means over
      valid pairs) and ``reward_margin``.
    """
    arrays = [
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths,
    ]
    chex.assert_rank(arrays, 1)
    chex.assert_equal_shape(arrays)
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    preference = -jax.nn.log_sigmoid(beta * margin)
    nll = -policy_chosen_logps / jnp.maximum(chosen_lengths.astype(margin.dtype), 1.0)
    weights = None if valid is None else valid.astype(margin.dtype)
    loss, denominator = reduce_loss(preference + nll_coef * nll, weights, reduction=reduction)
    count = jnp.maximum(denominator, 1.0)
    usable = jnp.ones_like(margin) if weights is None else weights
    metrics = {
        "denominator": denominator,
        "dpo_loss": jnp.sum(usable * preference) / count,
        "nll": jnp.sum(usable * nll) / count,
        "reward_margin": jnp.sum(usable * jax.lax.stop_gradient(beta * margin)) / count,
    }
    return loss, metrics
