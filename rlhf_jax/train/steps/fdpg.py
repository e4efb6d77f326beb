"""f-DPG step: distributional policy gradient toward ``p ∝ π_ref · exp(r/β)`` on sampled replies.

Go et al. (2023), "Aligning Language Models with Preferences through f-divergence
Minimization" (f-DPG), §2: minimise ``D_f(π_θ ‖ p)`` for the energy-based target with
log-unnormalised scores ``log P(x, y) = log π_ref(y|x) + r(x, y)/β``, ``r`` a trained
reward model (the KL-regularised RLHF optimum). One step of a batch of P prompts:

1. draw n replies per prompt from the proposal q: the current policy (on-policy,
   ``online=True``) or the frozen initial policy (``online=False``), with the sampler's
   own log-probabilities ``log q`` (temperature 1, no truncation, so q is the policy);
2. score them: ``log P = log π_ref + r/β`` with the frozen reference and reward model;
3. estimate each prompt's partition function from its n samples,
   ``log Ẑ(x) = log (1/n) Σ_i P(x, y_i)/q(y_i|x)``
   (:func:`rlhf_jax.objectives.fdpg.importance_log_partition`);
4. take one gradient step of the f-DPG surrogate
   (:func:`rlhf_jax.objectives.fdpg.fdpg_loss`) with the leave-one-out baseline
   ``b_i = mean_{j≠i} f'(π_θ(y_j)/p(y_j))`` over the prompt's other samples, which
   does not depend on ``y_i`` and so keeps the gradient unbiased.

The authors' library (naver/disco) keeps a running estimate of Z and a moving-average
baseline across batches; here both come from the n samples of each prompt in the batch,
so the step stays a pure function of its inputs. The divergence estimate, the mean
reward-model score and the sequence-level KL to the reference are reported.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import Array

from rlhf_jax.models.logprobs import sequence_logprobs
from rlhf_jax.objectives.fdpg import (
    DIVERGENCES,
    Divergence,
    f_derivative,
    fdpg_loss,
    importance_log_partition,
)
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train.state import Metrics, PyTree, TrainState
from rlhf_jax.train.steps.common import Batch, StepFn
from rlhf_jax.train.steps.rollout import (
    frozen_token_logprobs,
    generate,
    rollout_metrics,
    sequence_scores,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FDPGConfig:
    """Static settings of an f-DPG step.

    Attributes:
      sampling: the sampler's settings; temperature 1 without top-k/top-p, so that its
        log-probabilities are the proposal's.
      num_samples: n ≥ 2, replies per prompt (for Ẑ and the leave-one-out baseline).
      beta: β of the target ``π_ref exp(r/β)``.
      divergence: one of ``DIVERGENCES``.
      online: sample from the current policy (``True``) or the initial one.
    """

    sampling: SamplingConfig
    num_samples: int = 4
    beta: float = 0.1
    divergence: Divergence = "forward_kl"
    online: bool = True

    def __post_init__(self) -> None:
        if self.num_samples < 2:
            raise ValueError("FDPGConfig.num_samples must be >= 2 (leave-one-out baseline)")
        if self.beta <= 0.0:
            raise ValueError(f"FDPGConfig.beta must be positive, got {self.beta}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(
                f"FDPGConfig.divergence must be one of {DIVERGENCES}, got {self.divergence!r}"
            )


def init_fdpg_extra(
    *, reference_params: PyTree, reward_params: PyTree, initial_params: PyTree | None = None
) -> dict:
    """``state.extra``: frozen reference and reward model (and the initial policy if offline)."""
    extra = {"reference_params": reference_params, "reward_params": reward_params}
    if initial_params is not None:
        extra["initial_params"] = initial_params
    return extra


def leave_one_out_mean(values: Array) -> Array:
    """``b_i = mean_{j≠i} v_j`` along the last axis (``[P, n]``, n ≥ 2)."""
    n = values.shape[-1]
    return (jnp.sum(values, axis=-1, keepdims=True) - values) / (n - 1)


def make_fdpg_step(
    policy_graphdef: nnx.GraphDef,
    reward_graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    config: FDPGConfig,
) -> StepFn:
    """The pure f-DPG step ``step(state, prompts, rng) -> (state, metrics)``.

    Args:
      policy_graphdef: the policy's (and reference's) graph definition.
      reward_graphdef: the reward model's.
      tx: the optax transformation of ``state.opt_state``.
      config: the step's static settings.

    Returns:
      The step; ``prompts`` holds left-padded ``input_ids`` and ``attention_mask``
      ``[P, L_p]``. Metrics: ``loss`` (the surrogate), ``divergence`` (estimate of
      ``D_f(π_θ ‖ p)``), ``importance_weight``, ``log_ratio``, ``reward_score``, ``kl``
      (mean ``log π_θ/π_ref`` of the samples), ``response_length``, ``eos_fraction``,
      ``grad_norm``, ``nonfinite``.
    """
    n = config.num_samples

    def step(state: TrainState, prompts: Batch, rng: Array) -> tuple[TrainState, Metrics]:
        sampler = state.params if config.online else state.extra["initial_params"]
        repeated = {k: jnp.repeat(prompts[k], n, axis=0) for k in ("input_ids", "attention_mask")}
        output = generate(policy_graphdef, sampler, repeated, rng, sampling=config.sampling)
        mask = output.response_mask
        proposal_logps = jnp.sum(output.logprobs * mask, axis=-1)
        ref_logps = jnp.sum(
            frozen_token_logprobs(
                policy_graphdef,
                state.extra["reference_params"],
                output.tokens,
                output.attention_mask,
                mask,
            ),
            axis=-1,
        )
        rewards = sequence_scores(
            reward_graphdef, state.extra["reward_params"], output.tokens, output.attention_mask
        )
        target_log_scores = ref_logps + rewards / config.beta
        P = prompts["input_ids"].shape[0]
        log_partition = jax.vmap(importance_log_partition)(
            target_log_scores.reshape(P, n), proposal_logps.reshape(P, n)
        )
        log_partition = jnp.repeat(log_partition, n)

        def loss_fn(params: PyTree) -> tuple[Array, Metrics]:
            _, policy_logps = sequence_logprobs(
                nnx.merge(policy_graphdef, params), output.tokens, output.attention_mask, mask
            )
            log_ratio = jax.lax.stop_gradient(policy_logps - (target_log_scores - log_partition))
            signal = f_derivative(log_ratio, config.divergence).reshape(P, n)
            loss, metrics = fdpg_loss(
                policy_logps,
                proposal_logps,
                target_log_scores,
                log_partition,
                divergence=config.divergence,
                baseline=leave_one_out_mean(signal).reshape(-1),
                reduction="mean",
            )
            kl = jnp.mean(jax.lax.stop_gradient(policy_logps) - ref_logps)
            return loss, {**metrics, "kl": kl}

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state, guard = state.apply_finite_gradients(grads, tx, loss=loss)
        return state, {
            **metrics,
            **guard,
            **rollout_metrics(output, config.sampling.eos_id),
            "loss": loss,
            "reward_score": jnp.mean(rewards),
        }

    return step
