"""AlignDistil step: on-policy token-level distillation toward a DPO-built teacher.

Zhang et al. (2025), "AlignDistil: Token-Level Language Model Alignment as Adaptive Policy
Distillation". With the DPO implicit reward in the RLHF objective the optimal policy is,
token by token, the teacher

    π_T(·|s_t) ∝ π_ref(·|s_t)^{1−c} · π_dpo(·|s_t)^c,     c = β_dpo/β,

(:func:`rlhf_jax.objectives.align_distil.teacher_logp`), and the objective becomes the
per-token distillation ``E_{y∼π_θ} Σ_t KL(π_θ(·|s_t) ‖ π_T(·|s_t))``
(:func:`rlhf_jax.objectives.align_distil.align_distil_loss`). One step of a batch of
prompts samples one reply each from the current policy, evaluates the frozen models on it,
builds the teacher at every response position (:func:`build_teacher`) and takes one
gradient step of the distillation loss (reverse KL by default, the form in the objective;
forward KL as an option).

Teachers (``AlignDistilConfig.teacher``):

- ``"dpo"``: ``z_ref + c (z_dpo − z_ref)`` from the reference and the DPO model;
- ``"contrastive"``: the contrastive reward ``β_dpo log π_dpo/π_rdpo`` of the DPO model and a
  reverse DPO model (trained on flipped preferences) gives ``z_a + c (z_dpo − z_rdpo)``
  around an anchor ``z_a``: the DPO model (``anchor="dpo"``, the extrapolation
  ``(1 + c) z_dpo − c z_rdpo`` between the two models of the paper's Figure 1) or the
  reference (``anchor="reference"``, the teacher of the RLHF objective with the contrastive
  reward plugged in; it is the DPO teacher exactly when the reverse model is the reference).

``adaptive=True`` replaces the fixed c by the token-adaptive extrapolation weight
``c_t = κ ‖π_dpo(·|s_t) − π_rdpo(·|s_t)‖₁ + ε``
(:func:`rlhf_jax.objectives.align_distil.adaptive_coefficient`), which needs the reverse
DPO model whichever teacher is chosen, and weights the KL at step t by ``1/c_t`` (its own
``β_t = β_dpo/c_t``; with a fixed c that weight is a constant and is left out).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import Array

from rlhf_jax.objectives.align_distil import (
    Direction,
    adaptive_coefficient,
    align_distil_loss,
    teacher_logp,
)
from rlhf_jax.objectives.reduction import reduce_loss
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train.state import Metrics, PyTree, TrainState
from rlhf_jax.train.steps.common import Batch, StepFn
from rlhf_jax.train.steps.rollout import generate, predicting_logits, rollout_metrics

Teacher = Literal["dpo", "contrastive"]
Anchor = Literal["dpo", "reference"]
TEACHERS = ("dpo", "contrastive")
ANCHORS = ("dpo", "reference")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlignDistilConfig:
    """Static settings of an AlignDistil step.

    Attributes:
      sampling: the sampler's settings for the on-policy replies.
      coefficient: c = β_dpo/β when not adaptive; 1 makes the DPO teacher the DPO policy
        itself, c > 1 extrapolates beyond it.
      direction: ``"reverse"`` ``KL(π_θ ‖ π_T)`` or ``"forward"`` ``KL(π_T ‖ π_θ)``.
      teacher: ``"dpo"`` (reference and DPO model) or ``"contrastive"`` (DPO and reverse
        DPO model).
      anchor: the contrastive teacher's anchor logits, ``"dpo"`` or ``"reference"``.
      adaptive: use the per-token ``c_t = adaptive_scale · ‖π_dpo − π_rdpo‖₁ + 10⁻³``
        and weight each step's KL by ``1/c_t``.
      adaptive_scale: κ of the adaptive rule.
    """

    sampling: SamplingConfig
    coefficient: float = 1.0
    direction: Direction = "reverse"
    teacher: Teacher = "dpo"
    anchor: Anchor = "dpo"
    adaptive: bool = False
    adaptive_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.direction not in ("reverse", "forward"):
            raise ValueError(f"direction must be 'reverse' or 'forward', got {self.direction!r}")
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, got {self.teacher!r}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {self.anchor!r}")

    @property
    def needs_reverse_dpo(self) -> bool:
        """Whether the teacher reads the reverse DPO model (contrastive or adaptive)."""
        return self.teacher == "contrastive" or self.adaptive


def init_align_distil_extra(
    *, reference_params: PyTree, dpo_params: PyTree, reverse_dpo_params: PyTree | None = None
) -> dict:
    """``state.extra``: the frozen reference, DPO and (optionally) reverse DPO policies."""
    extra = {"reference_params": reference_params, "dpo_params": dpo_params}
    if reverse_dpo_params is not None:
        extra["reverse_dpo_params"] = reverse_dpo_params
    return extra


def build_teacher(
    ref_logits: Array,
    dpo_logits: Array,
    reverse_dpo_logits: Array | None,
    config: AlignDistilConfig,
) -> tuple[Array, Array]:
    """The teacher log-probabilities ``[B, T, V]`` and the coefficient used ``[B, T]``.

    Args:
      ref_logits: ``[B, T, V]`` reference logits at each position.
      dpo_logits: ``[B, T, V]`` DPO model logits.
      reverse_dpo_logits: ``[B, T, V]`` reverse DPO model logits, or ``None`` when the
        config needs none (``config.needs_reverse_dpo`` is false).
      config: the teacher, anchor and coefficient settings.

    Returns:
      ``(teacher_logps, coefficient)``; the coefficient is ``config.coefficient`` at every
      position, or the adaptive ``c_t``.
    """
    if config.needs_reverse_dpo and reverse_dpo_logits is None:
        raise ValueError(
            f"teacher={config.teacher!r}, adaptive={config.adaptive} needs the reverse DPO logits"
        )
    if config.adaptive:
        coefficient = adaptive_coefficient(
            dpo_logits, reverse_dpo_logits, scale=config.adaptive_scale
        )
    else:
        coefficient = config.coefficient
    if config.teacher == "dpo":
        teacher = teacher_logp(ref_logits, dpo_logits, coefficient=coefficient)
    else:
        anchor = dpo_logits if config.anchor == "dpo" else ref_logits
        teacher = teacher_logp(anchor, dpo_logits, reverse_dpo_logits, coefficient=coefficient)
    return teacher, jnp.broadcast_to(jnp.asarray(coefficient, teacher.dtype), teacher.shape[:-1])


def _logits(graphdef: nnx.GraphDef, params: PyTree, tokens: Array, attention_mask: Array) -> Array:
    """Logits aligned with the tokens: column t holds the distribution of token t."""
    logits, _ = nnx.merge(graphdef, params)(tokens, attention_mask=attention_mask)
    return predicting_logits(logits)


def make_align_distil_step(
    policy_graphdef: nnx.GraphDef, tx: optax.GradientTransformation, config: AlignDistilConfig
) -> StepFn:
    """The pure AlignDistil step ``step(state, prompts, rng) -> (state, metrics)``.

    Args:
      policy_graphdef: the graph definition of the policy and of every frozen model.
      tx: the optax transformation of ``state.opt_state``.
      config: the step's static settings.

    Returns:
      The step; ``prompts`` holds left-padded ``input_ids`` and ``attention_mask``.
      Metrics: ``loss`` (per-token KL to the teacher, weighted by ``1/c_t`` when
      adaptive), ``teacher_agreement``,
      ``coefficient`` (the mean c_t over response tokens), ``response_length``,
      ``eos_fraction``, ``grad_norm``, ``nonfinite``.
    """

    def step(state: TrainState, prompts: Batch, rng: Array) -> tuple[TrainState, Metrics]:
        output = generate(policy_graphdef, state.params, prompts, rng, sampling=config.sampling)
        tokens, attention_mask = output.tokens, output.attention_mask

        def frozen_logits(name: str) -> Array:
            params = jax.lax.stop_gradient(state.extra[name])
            return _logits(policy_graphdef, params, tokens, attention_mask)

        reverse = frozen_logits("reverse_dpo_params") if config.needs_reverse_dpo else None
        teacher, coefficient = build_teacher(
            frozen_logits("reference_params"), frozen_logits("dpo_params"), reverse, config
        )
        teacher = jax.lax.stop_gradient(teacher)
        mask = output.response_mask.astype(jnp.float32)
        token_weights = 1.0 / coefficient if config.adaptive else None

        def loss_fn(params: PyTree) -> tuple[Array, Metrics]:
            student = _logits(policy_graphdef, params, tokens, attention_mask)
            return align_distil_loss(
                student,
                teacher,
                mask,
                direction=config.direction,
                token_weights=token_weights,
                reduction="mean",
            )

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state, guard = state.apply_finite_gradients(grads, tx, loss=loss)
        return state, {
            **metrics,
            **guard,
            **rollout_metrics(output, config.sampling.eos_id),
            "loss": loss,
            "coefficient": reduce_loss(coefficient, mask)[0],
        }

    return step
