"""AlignDistil: RLHF with a DPO reward as token-level distillation toward a logit-mixed teacher.

Zhang et al. (2025), "AlignDistil: Token-Level Language Model Alignment as Adaptive Policy
Distillation". Put the DPO implicit reward ``r(x, y) = β_d Σ_t log π_dpo(y_t|s_t)/π_ref(y_t|s_t)``
(``s_t = (x, y_<t)``) into the RLHF objective ``E_π[r] − β KL(π ‖ π_ref)``. Token by token,

    J(π) = −β E_{y∼π} Σ_t [ KL(π(·|s_t) ‖ π_T(·|s_t)) − log Z(s_t) ],
    π_T(·|s) ∝ π_ref(·|s)^{1−c} π_dpo(·|s)^c,     c = β_d/β,

i.e. the teacher's logits are the linear combination ``z_ref + c (z_dpo − z_ref)`` of the
reference and DPO log-probabilities (the paper's equivalence theorem). The contrastive reward
``β_d log π_dpo/π_rdpo`` of a DPO model and a *reverse* DPO model (trained on flipped
preferences) gives the teacher ``z_ref + c (z_dpo − z_rdpo)``; with the DPO model as the
anchor (``ref_logits=dpo_logits``) this is the extrapolation ``(1 + c) z_dpo − c z_rdpo``
between the two models that the paper's Figure 1 depicts. The token-adaptive
extrapolation (§3.3) gives every step its own ``β_t`` and hence its own ``c_t = β_d/β_t``:

    c_t = κ ‖π_dpo(·|s_t) − π_rdpo(·|s_t)‖₁ + ε,     β_t = β_d / c_t,

so a step where the DPO and reverse DPO models disagree (a token the contrastive reward
says much about) is extrapolated further and held less tightly, and a step where they
agree stays near the anchor (``adaptive_coefficient``; ε = 10⁻³ keeps ``c_t > 0``). This is
the rule of the authors' released implementation (the L1 distance, twice the total
variation, scaled by κ); the per-token objective is then ``Σ_t β_t KL_t``, i.e. the KL at
step t weighted by ``1/c_t`` relative to β_d (``align_distil_loss``'s ``token_weights``).
Any other rule can be passed to ``teacher_logp`` as a per-token coefficient.

The distillation loss is the per-token KL between the student and the (stop-gradient)
teacher, reverse ``KL(π_θ ‖ π_T)`` (the form that appears in J) or forward
``KL(π_T ‖ π_θ)``; both are minimised by ``π_θ = π_T`` at every visited prefix.

Exactness: when c = 1 the soft values vanish (``Z ≡ 1``) and the teacher *is* the
sequence-level optimum ``π* ∝ π_ref exp(r/β)``; for one-token responses it is the optimum
for every c. For c ≠ 1 on longer sequences the ``log Z(s_t)`` terms depend on π through
the visited prefixes, so the distillation optimum (the teacher) differs from π* by the
soft-value correction (``tabular.sequence.soft_optimal_token_logp`` gives π* exactly);
the paper optimises the distillation term and treats this as its surrogate.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp
from jax import Array

from rlhf_jax.objectives.reduction import Reduction, reduce_loss

Direction = Literal["reverse", "forward"]


def teacher_logp(
    ref_logits: Array,
    dpo_logits: Array,
    reverse_dpo_logits: Array | None = None,
    *,
    coefficient: Array | float,
) -> Array:
    """Teacher log-probabilities ``log_softmax(z_ref + c (z_dpo − z_base))``, ``[..., V]``.

    ``z`` are log-softmax-normalised logits; ``z_base`` is ``z_ref`` for the DPO reward and
    ``z_rdpo`` for the contrastive reward. ``coefficient`` c (β_d/β, or the adaptive
    ``[...]`` per-token value) broadcasts against the leading axes.
    """
    chex.assert_equal_shape([ref_logits, dpo_logits])
    z_ref = jax.nn.log_softmax(ref_logits, axis=-1)
    z_dpo = jax.nn.log_softmax(dpo_logits, axis=-1)
    if reverse_dpo_logits is None:
        z_base = z_ref
    else:
        chex.assert_equal_shape([ref_logits, reverse_dpo_logits])
        z_base = jax.nn.log_softmax(reverse_dpo_logits, axis=-1)
    coefficient = jnp.asarray(coefficient, z_ref.dtype)
    if coefficient.ndim:
        coefficient = coefficient[..., None]
    return jax.nn.log_softmax(z_ref + coefficient * (z_dpo - z_base), axis=-1)


def adaptive_coefficient(
    dpo_logits: Array,
    reverse_dpo_logits: Array,
    *,
    scale: float,
    floor: float = 1e-3,
) -> Array:
    """Token-adaptive extrapolation ``c_t = κ ‖π_dpo − π_rdpo‖₁ + ε``, ``[...]`` (module docstring).

    Args:
      dpo_logits: ``[..., V]`` logits of the DPO model.
      reverse_dpo_logits: ``[..., V]`` logits of the reverse DPO model.
      scale: κ.
      floor: ε, the coefficient where the two models agree exactly.

    Returns:
      ``[...]`` the per-step coefficient ``c_t``.
    """
    chex.assert_equal_shape([dpo_logits, reverse_dpo_logits])
    p = jax.nn.softmax(dpo_logits, axis=-1)
    q = jax.nn.softmax(reverse_dpo_logits, axis=-1)
    return scale * jnp.sum(jnp.abs(p - q), axis=-1) + floor


def align_distil_loss(
    policy_logits: Array,
    teacher_logps: Array,
    mask: Array,
    *,
    direction: Direction = "reverse",
    token_weights: Array | None = None,
    reduction: Reduction = "mean",
) -> tuple[Array, dict[str, Array]]:
    """Per-token distillation ``KL(π_θ ‖ π_T)`` (reverse) or ``KL(π_T ‖ π_θ)`` (forward).

    ``L = Σ_t m_t w_t KL_t / Σ_t m_t`` (``"mean"``) with ``w_t`` the ``token_weights`` (1
    by default; the adaptive rule's ``1/c_t``, module docstring).

    Args:
      policy_logits: ``[B, T, V]`` student logits at each response position.
      teacher_logps: ``[B, T, V]`` teacher log-probabilities (``teacher_logp``); treated
        as constants.
      mask: ``[B, T]`` token weights (1 on response tokens; exact prefix probabilities for
        a population objective).
      direction: ``"reverse"`` or ``"forward"``.
      token_weights: optional ``[B, T]`` weights of the per-token KL (constants).
      reduction: ``"mean"`` (per token) or ``"sum"``.

    Returns:
      ``(loss, metrics)`` with ``"denominator"`` (Σ mask) and ``"teacher_agreement"`` (the
      weighted fraction of positions where student and teacher have the same argmax).
    """
    chex.assert_rank([policy_logits, teacher_logps], 3)
    chex.assert_equal_shape([policy_logits, teacher_logps])
    chex.assert_shape(mask, policy_logits.shape[:2])
    student = jax.nn.log_softmax(policy_logits, axis=-1)
    teacher = jax.lax.stop_gradient(teacher_logps)
    if direction == "reverse":
        per_token = jnp.sum(jnp.exp(student) * (student - teacher), axis=-1)
    elif direction == "forward":
        per_token = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
    else:
        raise ValueError(f"direction must be 'reverse' or 'forward', got {direction!r}")
    if token_weights is not None:
        chex.assert_equal_shape([token_weights, mask])
        per_token = per_token * jax.lax.stop_gradient(token_weights)
    loss, denominator = reduce_loss(per_token, mask, reduction=reduction)
    agree = (jnp.argmax(student, -1) == jnp.argmax(teacher, -1)).astype(per_token.dtype)
    return loss, {"denominator": denominator, "teacher_agreement": reduce_loss(agree, mask)[0]}
