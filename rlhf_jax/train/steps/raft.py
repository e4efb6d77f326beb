"""RAFT step: sample n replies per prompt, keep the best by the reward model, fine-tune on them.

Reward-ranked fine-tuning (Dong et al., 2023, "RAFT: Reward rAnked FineTuning for
Generative Foundation Model Alignment", Algorithm 1). One step of a batch of P prompts:

1. draw n replies per prompt from the sampling policy (the jitted KV-cache sampler);
2. score every reply with the frozen reward model, ``rewards [P, n]``;
3. keep the best of each prompt's n replies (``ranking="local"``) or the ``top_k`` best of
   all ``P·n`` (``"global"``), and take one gradient step of the SFT loss on the kept
   replies (:func:`rlhf_jax.objectives.raft.raft_loss`, token-normalised).

``online=True`` samples from the current policy (the paper's iterated RAFT);
``online=False`` samples from the frozen initial policy kept in ``state.extra``
(offline RAFT: the data are best-of-n samples of the start policy). The loss is computed
on all ``P·n`` rows with the unselected rows masked out, so one program serves both
rankings; a global ranking couples the prompts of a batch and is refused with more than
one micro-batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import Array

from rlhf_jax.models.logprobs import sequence_logprobs
from rlhf_jax.objectives.raft import Ranking, raft_loss
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train.state import Metrics, PyTree, SumLossFn, TrainState, accumulate_gradients
from rlhf_jax.train.steps.common import Batch, StepFn
from rlhf_jax.train.steps.rollout import generate, rollout_metrics, sequence_scores

RANKINGS = ("local", "global")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RAFTConfig:
    """Static settings of a RAFT step.

    Attributes:
      sampling: the sampler's settings (``max_new_tokens``, temperature, eos).
      num_samples: n, replies drawn per prompt.
      ranking: ``"local"`` (best of n per prompt) or ``"global"`` (top ``top_k`` overall).
      top_k: replies kept by the global ranking (default: the number of prompts).
      online: sample from the current policy (``True``) or the initial one (``False``).
      num_micro_batches: gradient-accumulation micro-batches over the prompts.
    """

    sampling: SamplingConfig
    num_samples: int = 4
    ranking: Ranking = "local"
    top_k: int | None = None
    online: bool = True
    num_micro_batches: int = 1

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.num_micro_batches < 1:
            raise ValueError("RAFTConfig.num_samples and num_micro_batches must be >= 1")
        if self.ranking not in RANKINGS:
            raise ValueError(f"RAFTConfig.ranking must be one of {RANKINGS}, got {self.ranking!r}")
        if self.ranking == "global" and self.num_micro_batches > 1:
            raise ValueError("a global ranking couples the prompts of a batch; use one micro-batch")


def init_raft_extra(*, reward_params: PyTree, initial_params: PyTree | None = None) -> dict:
    """``state.extra`` of a RAFT run: the reward model, and the initial policy when offline."""
    extra = {"reward_params": reward_params}
    if initial_params is not None:
        extra["initial_params"] = initial_params
    return extra


def raft_sum_loss(policy_graphdef: nnx.GraphDef, config: RAFTConfig) -> SumLossFn:
    """``loss_fn(params, micro_batch, rng) -> (Σ NLL of the kept replies, metrics)``.

    The micro-batch holds ``tokens``, ``attention_mask``, ``response_mask`` ``[P, n, L]``
    and ``rewards`` ``[P, n]``.
    """

    def loss_fn(params: PyTree, batch: Batch, rng: Array) -> tuple[Array, Metrics]:
        del rng
        P, n, L = batch["tokens"].shape
        flat = {k: batch[k].reshape(P * n, L) for k in ("tokens", "attention_mask")}
        mask = batch["response_mask"].reshape(P * n, L)
        per_token, _ = sequence_logprobs(
            nnx.merge(policy_graphdef, params), flat["tokens"], flat["attention_mask"], mask
        )
        return raft_loss(
            per_token.reshape(P, n, L),
            mask.reshape(P, n, L).astype(jnp.float32),
            batch["rewards"],
            ranking=config.ranking,
            top_k=config.top_k,
            reduction="sum",
        )

    return loss_fn


def make_raft_step(
    policy_graphdef: nnx.GraphDef,
    reward_graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    config: RAFTConfig,
) -> StepFn:
    """The pure RAFT step ``step(state, prompts, rng) -> (state, metrics)``.

    Args:
      policy_graphdef: the policy decoder's graph definition.
      reward_graphdef: the reward model's (:class:`rlhf_jax.models.ScalarModel`).
      tx: the optax transformation of ``state.opt_state``.
      config: the step's static settings.

    Returns:
      The step; ``prompts`` holds left-padded ``input_ids`` and ``attention_mask``
      ``[P, L_p]``. Metrics: ``loss`` (NLL per kept token), ``selected_reward``,
      ``mean_reward`` (of all samples), ``reward_score`` (= ``mean_reward``),
      ``response_length``, ``eos_fraction``, ``grad_norm``, ``nonfinite``.
    """
    n = config.num_samples
    loss_fn = raft_sum_loss(policy_graphdef, config)

    def step(state: TrainState, prompts: Batch, rng: Array) -> tuple[TrainState, Metrics]:
        sample_key, loss_key = jax.random.split(rng)
        sampler = state.params if config.online else state.extra["initial_params"]
        repeated = {k: jnp.repeat(prompts[k], n, axis=0) for k in ("input_ids", "attention_mask")}
        output = generate(policy_graphdef, sampler, repeated, sample_key, sampling=config.sampling)
        rewards = sequence_scores(
            reward_graphdef, state.extra["reward_params"], output.tokens, output.attention_mask
        )
        P, M = prompts["input_ids"].shape[0], config.num_micro_batches
        if P % M:
            raise ValueError(f"{P} prompts are not divisible into {M} micro-batches")

        def group(x: Array) -> Array:
            return x.reshape(M, P // M, n, *x.shape[1:])

        micro_batches = {
            "tokens": group(output.tokens),
            "attention_mask": group(output.attention_mask),
            "response_mask": group(output.response_mask),
            "rewards": group(rewards),
        }
        loss, grads, metrics = accumulate_gradients(loss_fn, state.params, micro_batches, loss_key)
        state, guard = state.apply_finite_gradients(grads, tx, loss=loss)
        metrics = {
            **metrics,
            **guard,
            **rollout_metrics(output, config.sampling.eos_id),
            "loss": loss,
            "reward_score": jnp.mean(rewards),
        }
        return state, metrics

    return step
