"""AlignDistil step: on-policy token-level distillation toward a DPO-and-reference teacher.

Zhang et al. (2025), "AlignDistil": with the DPO implicit reward in the RLHF objective,
the optimal policy is, token by token, the teacher

    π_T(·|s_t) ∝ π_ref(·|s_t)^{1−c} · π_dpo(·|s_t)^c,     c = β_dpo/β,

(:func:`rlhf_jax.objectives.align_distil.teacher_logp`), and the objective becomes the
per-token distillation ``E_{y∼π_θ} Σ_t KL(π_θ(·|s_t) ‖ π_T(·|s_t))``
(:func:`rlhf_jax.objectives.align_distil.align_distil_loss`). One step of a batch of
prompts samples one reply each from the current policy, evaluates the frozen reference
and DPO models on it, builds the teacher at every response position and takes one
gradient step of the distillation loss (reverse KL by default, the form in the
objective; forward KL as an option). The coefficient c is fixed here; the paper's
token-adaptive extrapolation needs a reverse-DPO model as well and is not wired.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import Array

from rlhf_jax.objectives.align_distil import Direction, align_distil_loss, teacher_logp
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train.state import Metrics, PyTree, TrainState
from rlhf_jax.train.steps.common import Batch, StepFn
from rlhf_jax.train.steps.rollout import generate, predicting_logits, rollout_metrics


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlignDistilConfig:
    """Static settings of an AlignDistil step.

    Attributes:
      sampling: the sampler's settings for the on-policy replies.
      coefficient: c = β_dpo/β; 1 makes the teacher the DPO policy itself, c > 1
        extrapolates beyond it.
      direction: ``"reverse"`` ``KL(π_θ ‖ π_T)`` or ``"forward"`` ``KL(π_T ‖ π_θ)``.
    """

    sampling: SamplingConfig
    coefficient: float = 1.0
    direction: Direction = "reverse"

    def __post_init__(self) -> None:
        if self.direction not in ("reverse", "forward"):
            raise ValueError(f"direction must be 'reverse' or 'forward', got {self.direction!r}")


def init_align_distil_extra(*, reference_params: PyTree, dpo_params: PyTree) -> dict:
    """``state.extra``: the frozen reference and DPO policies the teacher is built from."""
    return {"reference_params": reference_params, "dpo_params": dpo_params}


def _logits(graphdef: nnx.GraphDef, params: PyTree, tokens: Array, attention_mask: Array) -> Array:
    """Logits aligned with the tokens: column t holds the distribution of token t."""
    logits, _ = nnx.merge(graphdef, params)(tokens, attention_mask=attention_mask)
    return predicting_logits(logits)


def make_align_distil_step(
    policy_graphdef: nnx.GraphDef, tx: optax.GradientTransformation, config: AlignDistilConfig
) -> StepFn:
    """The pure AlignDistil step ``step(state, prompts, rng) -> (state, metrics)``.

    Args:
      policy_graphdef: the graph definition of the policy, reference and DPO model.
      tx: the optax transformation of ``state.opt_state``.
      config: the step's static settings.

    Returns:
      The step; ``prompts`` holds left-padded ``input_ids`` and ``attention_mask``.
      Metrics: ``loss`` (per-token KL to the teacher), ``teacher_agreement``,
      ``response_length``, ``eos_fraction``, ``grad_norm``, ``nonfinite``.
    """

    def step(state: TrainState, prompts: Batch, rng: Array) -> tuple[TrainState, Metrics]:
        output = generate(policy_graphdef, state.params, prompts, rng, sampling=config.sampling)
        tokens, attention_mask = output.tokens, output.attention_mask
        frozen = jax.lax.stop_gradient
        teacher = frozen(
            teacher_logp(
                _logits(
                    policy_graphdef, frozen(state.extra["reference_params"]), tokens, attention_mask
                ),
                _logits(policy_graphdef, frozen(state.extra["dpo_params"]), tokens, attention_mask),
                coefficient=config.coefficient,
            )
        )
        mask = output.response_mask.astype(jnp.float32)

        def loss_fn(params: PyTree) -> tuple[Array, Metrics]:
            student = _logits(policy_graphdef, params, tokens, attention_mask)
            return align_distil_loss(
                student, teacher, mask, direction=config.direction, reduction="mean"
            )

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state, guard = state.apply_finite_gradients(grads, tx, loss=loss)
        return state, {
            **metrics,
            **guard,
            **rollout_metrics(output, config.sampling.eos_id),
            "loss": loss,
        }

    return step
