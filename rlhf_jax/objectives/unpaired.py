"""Direct-alignment losses for unpaired data: each response is labelled on its own.

KTO (desirable/undesirable labels with a reference point estimated from the batch), AOT
for unpaired data (stochastic dominance of the chosen over the rejected implicit-reward
distribution) and BCO (a binary classifier on the implicit reward). Log-probs are
per-sequence sums, ``[B]``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import Array

from rlhf_jax.objectives.links import logistic_loss
from rlhf_jax.objectives.reduction import Reduction, reduce_loss


def kto_reference_point(policy_kl_logps: Array, ref_kl_logps: Array) -> Array:
    """KTO's reference point ``z₀ = max(0, mean_j log π(y'_j|x_j)/π_ref(y'_j|x_j))``, detached.

    The ``(x_j, y'_j)`` are mismatched pairs (a prompt with another example's completion),
    so the mean estimates ``KL(π ‖ π_ref)`` on the batch (Ethayarajh et al., 2024, "KTO",
    the KL estimate of the reference point). No gradient flows through it.
    """
    chex.assert_rank([policy_kl_logps, ref_kl_logps], 1)
    chex.assert_equal_shape([policy_kl_logps, ref_kl_logps])
    return jax.lax.stop_gradient(jnp.maximum(jnp.mean(policy_kl_logps - ref_kl_logps), 0.0))


def kto_loss(
    policy_logps: Array,
    ref_logps: Array,
    desirable: Array,
    policy_kl_logps: Array,
    ref_kl_logps: Array,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """KTO: Kahneman–Tversky value of each labelled response against a reference point.

    With ``r = log π(y|x)/π_ref(y|x)`` and ``z₀`` from ``kto_reference_point``:
    ``v = λ_D σ(β(r − z₀))`` for desirable and ``λ_U σ(β(z₀ − r))`` for undesirable
    responses, and ``L = λ_y − v`` (Ethayarajh et al., 2024). Because z₀ is
    estimated from the batch, micro-batches of one step see different z₀ unless the caller
    computes the KL log-probs over the whole batch.

    Args:
      policy_logps: ``[B]`` log π(y|x).
      ref_logps: ``[B]`` log π_ref(y|x).
      desirable: ``[B]`` bool, the label.
      policy_kl_logps: ``[M]`` log π(y'|x) on mismatched pairs.
      ref_kl_logps: ``[M]`` log π_ref(y'|x) on mismatched pairs.
      beta: β.
      desirable_weight: λ_D.
      undesirable_weight: λ_U.
      reduction: ``"mean"`` or ``"sum"`` over responses.

    Returns:
      ``(loss, metrics)`` with ``"denominator"``, ``"reference_point"`` (z₀) and the mean
      implicit rewards ``β r`` of desirable and undesirable responses.
    """
    chex.assert_rank([policy_logps, ref_logps, desirable], 1)
    chex.assert_equal_shape([policy_logps, ref_logps, desirable])
    z0 = kto_reference_point(policy_kl_logps, ref_kl_logps)
    log_ratio = policy_logps - ref_logps
    per_item = jnp.where(
        desirable,
        desirable_weight * (1.0 - jax.nn.sigmoid(beta * (log_ratio - z0))),
        undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - log_ratio))),
    )
    loss, denominator = reduce_loss(per_item, reduction=reduction)
    rewards = jax.lax.stop_gradient(beta * log_ratio)
    dtype = rewards.dtype
    is_desirable = desirable.astype(dtype)
    n_desirable = jnp.maximum(jnp.sum(is_desirable), 1.0)
    n_undesirable = jnp.maximum(jnp.sum(1.0 - is_desirable), 1.0)
    return loss, {
        "denominator": denominator,
        "reference_point": z0,
        "desirable_rewards": jnp.sum(rewards * is_desirable) / n_desirable,
        "undesirable_rewards": jnp.sum(rewards * (1.0 - is_desirable)) / n_undesirable,
    }


def aot_unpaired_loss(
    policy_chosen_logps: Array,
    ref_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_rejected_logps: Array,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """AOT, unpaired: the chosen log-ratio distribution should dominate the rejected one.

    Melnyk et al. (2024), "Distributional Preference Alignment of LLMs via Optimal
    Transport", unpaired setting: with ``u_i = log π/π_ref`` on the chosen responses and
    ``v_i`` the same on the (unrelated) rejected responses, the optimal transport between
    their empirical distributions matches the sorted values (quantiles), and
    ``L = Σ_i (1 − ε) ℓ(β(u_(i) − v_(i))) + ε ℓ(−β(u_(i) − v_(i)))``. The two sets must
    have the same size B; the loss is invariant to permuting either set.
    """
    chosen = [policy_chosen_logps, ref_chosen_logps, policy_rejected_logps, ref_rejected_logps]
    chex.assert_rank(chosen, 1)
    chex.assert_equal_shape(chosen)
    chosen_sorted = jnp.sort(policy_chosen_logps - ref_chosen_logps)
    rejected_sorted = jnp.sort(policy_rejected_logps - ref_rejected_logps)
    logits = beta * (chosen_sorted - rejected_sorted)
    per_item = (1.0 - label_smoothing) * logistic_loss(logits) + label_smoothing * logistic_loss(
        -logits
    )
    loss, denominator = reduce_loss(per_item, reduction=reduction)
    return loss, {
        "denominator": denominator,
        "quantile_margin": jnp.mean(jax.lax.stop_gradient(logits)),
        "dominance_violation": jnp.mean((jax.lax.stop_gradient(logits) < 0).astype(logits.dtype)),
    }


def bco_unpaired_loss(
    policy_logps: Array,
    ref_logps: Array,
    desirable: Array,
    *,
    beta: float = 0.1,
    reward_shift: Array | float = 0.0,
    shift_decay: float = 0.99,
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """BCO on unpaired labels: logistic regression of the label on ``β r − δ``.

    ``L = ℓ(β r − δ)`` for desirable and ``ℓ(−(β r − δ))`` for undesirable responses, with
    ``r = log π/π_ref`` (Jung et al., 2024, "Binary Classifier Optimization"). δ is
    a running mean of the implicit rewards, passed in as state and held fixed in the loss;
    its update ``δ' = d·δ + (1 − d)·mean(β r)`` is returned as ``metrics["reward_shift"]``.
    (The paper's density-ratio reweighting for mismatched distributions is not included.)
    """
    chex.assert_rank([policy_logps, ref_logps, desirable], 1)
    chex.assert_equal_shape([policy_logps, ref_logps, desirable])
    rewards = beta * (policy_logps - ref_logps)
    shift = jax.lax.stop_gradient(jnp.asarray(reward_shift, rewards.dtype))
    signed = jnp.where(desirable, 1.0, -1.0).astype(rewards.dtype)
    per_item = logistic_loss(signed * (rewards - shift))
    loss, denominator = reduce_loss(per_item, reduction=reduction)
    new_shift = shift_decay * shift + (1.0 - shift_decay) * jnp.mean(jax.lax.stop_gradient(rewards))
    return loss, {
        "denominator": denominator,
        "reward_shift": new_shift,
        "accuracy": jnp.mean(
            (jax.lax.stop_gradient(signed * (rewards - shift)) > 0).astype(rewards.dtype)
        ),
    }
