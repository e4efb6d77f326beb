"""Rollout and update plumbing shared by the online RL steps (PPO, Safe-RLHF, Nash-MD).

An online step samples responses from the current policy with the jitted KV-cache sampler
(:func:`rlhf_jax.sampling.sample`), scores them, and then takes several epochs of
minibatch gradient steps on the fixed rollout. Everything here is pure and traceable, so
a whole iteration is one jitted program.

Alignment conventions (``L = P + N`` columns: the left-padded prompt, then the response):

- per-token log-probs are aligned with the tokens, ``logp[:, t] = log π(x_t | x_<t)``,
  zero outside the response (:func:`rlhf_jax.models.logprobs.response_logprobs`);
- a value model's scalar at column ``t`` summarises ``x_≤t``, so the value of the state in
  which response token ``t`` is chosen is the scalar at column ``t − 1``
  (:func:`state_values`); per-token rewards, values, advantages and returns are then all
  aligned with the tokens and masked by ``response_mask``;
- a sequence score (reward or cost model) is the scalar at the last real token
  (:meth:`rlhf_jax.models.ScalarModel.score`), i.e. after the EOS when one was sampled.

The update (:func:`ppo_epochs`) runs ``epochs`` passes over the rollout, each in a fresh
random order cut into ``num_minibatches`` minibatches; each minibatch's gradient is
accumulated over ``num_micro_batches`` with the ``reduction="sum"`` convention and applied
unless it is non-finite (Schulman et al., 2017, Algorithm 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import Array

from rlhf_jax.models.logprobs import response_logprobs
from rlhf_jax.objectives.kl import Estimator, kl_k3
from rlhf_jax.objectives.ppo import (
    Normalisation,
    entropy_bonus_loss,
    ppo_policy_loss,
    ppo_value_loss,
    reduce_tokens,
)
from rlhf_jax.objectives.reduction import masked_mean
from rlhf_jax.sampling import SampleOutput, SamplingConfig, sample
from rlhf_jax.train.state import Metrics, PyTree, TrainState, accumulate_gradients

KLMode = Literal["reward", "loss"]
KL_MODES = ("reward", "loss")
ActorCriticFn = Callable[[PyTree, Array, Array], tuple[Array, dict[str, Array]]]
"""``forward(params, tokens, attention_mask) -> (logits [B, L, V], {critic: scalars [B, L]})``."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOUpdateConfig:
    """Static hyper-parameters of the PPO update shared by PPO and Safe-RLHF.

    Attributes:
      epochs: passes over each rollout (Schulman et al., 2017, "K epochs").
      num_minibatches: minibatches per epoch; must divide the number of prompts.
      num_micro_batches: gradient-accumulation micro-batches per minibatch.
      clip_eps: ratio clip ε of the surrogate (eq. 7).
      value_clip_eps: value clip ε, or ``None`` for the plain squared error.
      value_coef: weight c₁ of every critic's value loss.
      entropy_coef: weight c₂ of the entropy bonus.
      normalisation: ``"token"`` or ``"sequence"`` (see :mod:`rlhf_jax.objectives.ppo`).
      kl_mode: ``"reward"`` folds ``−β·KL`` into the per-token rewards (Ziegler et al.,
        2019); ``"loss"`` adds ``β·k3`` to the loss instead (as GRPO does).
      kl_estimator: per-token KL estimator used in the rewards and in the metrics.
      gamma: discount γ of GAE.
      lam: GAE λ.
      whiten_advantages: standardise advantages over the response tokens of the rollout.
    """

    epochs: int = 4
    num_minibatches: int = 1
    num_micro_batches: int = 1
    clip_eps: float = 0.2
    value_clip_eps: float | None = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    normalisation: Normalisation = "token"
    kl_mode: KLMode = "reward"
    kl_estimator: Estimator = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "num_minibatches", "num_micro_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"PPOUpdateConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.kl_mode not in KL_MODES:
            raise ValueError(
                f"PPOUpdateConfig.kl_mode must be one of {KL_MODES}, got {self.kl_mode!r}"
            )


def generate(
    policy_graphdef: nnx.GraphDef,
    policy_params: PyTree,
    prompts: Mapping[str, Array],
    rng: Array,
    *,
    sampling: SamplingConfig,
) -> SampleOutput:
    """Sample one response per left-padded prompt (``input_ids``, ``attention_mask`` ``[B, P]``).

    The rollout is data: gradients never flow through it.
    """
    chex.assert_rank([prompts["input_ids"], prompts["attention_mask"]], 2)
    output = sample(
        policy_graphdef,
        jax.lax.stop_gradient(policy_params),
        prompts["input_ids"],
        prompts["attention_mask"],
        rng,
        config=sampling,
    )
    return jax.lax.stop_gradient(output)


def sequence_scores(
    graphdef: nnx.GraphDef, params: PyTree, tokens: Array, attention_mask: Array
) -> Array:
    """Scores ``[B]`` of a frozen scalar model (reward or cost) at each row's last real token."""
    model = nnx.merge(graphdef, jax.lax.stop_gradient(params))
    return jax.lax.stop_gradient(model.score(tokens, attention_mask))


def frozen_token_logprobs(
    graphdef: nnx.GraphDef,
    params: PyTree,
    tokens: Array,
    attention_mask: Array,
    response_mask: Array,
) -> Array:
    """Per-token response log-probs ``[B, L]`` of a frozen decoder (e.g. the reference)."""
    model = nnx.merge(graphdef, jax.lax.stop_gradient(params))
    logits, _ = model(tokens, attention_mask=attention_mask)
    per_token, _ = response_logprobs(logits, tokens, response_mask)
    return jax.lax.stop_gradient(per_token)


def state_values(scalars: Array, response_mask: Array) -> Array:
    """Values aligned with tokens: ``V_t = scalars[:, t − 1]`` on response tokens, 0 elsewhere.

    The scalar at column ``t − 1`` has read ``x_<t``, the state in which token ``t`` is
    chosen.
    """
    chex.assert_equal_shape([scalars, response_mask])
    shifted = jnp.pad(scalars[:, :-1], ((0, 0), (1, 0)))
    return shifted * response_mask.astype(scalars.dtype)


def predicting_logits(logits: Array) -> Array:
    """Logits aligned with tokens: column ``t`` holds the distribution of token ``t``."""
    chex.assert_rank(logits, 3)
    return jnp.pad(logits[:, :-1], ((0, 0), (1, 0), (0, 0)))


def whiten(values: Array, mask: Array, *, epsilon: float = 1e-8) -> Array:
    """``(x − mean) / (std + ε)`` over the masked entries, 0 elsewhere."""
    chex.assert_equal_shape([values, mask])
    mean = masked_mean(values, mask)
    variance = masked_mean(jnp.square(values - mean), mask)
    return (values - mean) / (jnp.sqrt(variance) + epsilon) * mask.astype(values.dtype)


def actor_critic_sum_loss(
    forward: ActorCriticFn,
    critics: Sequence[str],
    config: PPOUpdateConfig,
    kl_coef: Array,
) -> Callable[[PyTree, Mapping[str, Array], Array], tuple[Array, Metrics]]:
    """``loss_fn(params, micro_batch, rng) -> (Σ loss, metrics)`` of the PPO objective.

    ``L = L^CLIP(advantages) + c₁ Σ_critics L^VF − c₂ H [+ β k3 when kl_mode="loss"]``
    (Schulman et al., 2017, eq. 9), every term token- or sequence-normalised with one
    shared denominator. The micro-batch holds ``tokens``, ``attention_mask``,
    ``response_mask``, ``old_logprobs``, ``ref_logprobs``, ``advantages`` and, per critic,
    ``<critic>_old_values`` and ``<critic>_returns``. The metrics report each term as
    a mean over the micro-batch (the summed loss itself is what is differentiated).
    """

    def loss_fn(params: PyTree, batch: Mapping[str, Array], rng: Array) -> tuple[Array, Metrics]:
        del rng
        logits, scalars = forward(params, batch["tokens"], batch["attention_mask"])
        return actor_critic_loss(logits, scalars, batch, critics, config, kl_coef)

    return loss_fn


def actor_critic_loss(
    logits: Array,
    scalars: Mapping[str, Array],
    batch: Mapping[str, Array],
    critics: Sequence[str],
    config: PPOUpdateConfig,
    kl_coef: Array,
) -> tuple[Array, Metrics]:
    """The summed PPO objective of :func:`actor_critic_sum_loss` from a forward pass's outputs.

    Args:
      logits: ``[B, L, V]`` the policy's logits on ``batch["tokens"]``.
      scalars: per critic, its ``[B, L]`` scalars on the same tokens.
      batch: the rollout arrays (keys as in :func:`actor_critic_sum_loss`).
      critics: the critics' names.
      config: the update's hyper-parameters.
      kl_coef: β of the ``kl_mode="loss"`` term.

    Returns:
      ``(Σ loss, metrics)`` with ``denominator`` and each term as a mean.
    """
    mask = batch["response_mask"]
    logp, _ = response_logprobs(logits, batch["tokens"], mask)
    loss, metrics = ppo_policy_loss(
        logp,
        batch["old_logprobs"],
        batch["advantages"],
        mask,
        clip_eps=config.clip_eps,
        normalisation=config.normalisation,
        reduction="sum",
    )
    denominator = jnp.maximum(metrics["denominator"], 1.0)
    metrics = {**metrics, "policy_loss": loss / denominator}
    for name in critics:
        value_loss, value_metrics = ppo_value_loss(
            state_values(scalars[name], mask),
            batch[f"{name}_old_values"],
            batch[f"{name}_returns"],
            mask,
            clip_eps=config.value_clip_eps,
            normalisation=config.normalisation,
            reduction="sum",
        )
        loss = loss + config.value_coef * value_loss
        metrics[f"{name}_value_loss"] = value_loss / denominator
        metrics[f"{name}_value_clip_fraction"] = value_metrics["value_clip_fraction"]
    if config.entropy_coef > 0.0:
        entropy_loss, _ = entropy_bonus_loss(
            predicting_logits(logits),
            mask,
            normalisation=config.normalisation,
            reduction="sum",
        )
        loss = loss + config.entropy_coef * entropy_loss
        metrics["entropy_loss"] = entropy_loss / denominator
    if config.kl_mode == "loss":
        kl_term, _ = reduce_tokens(
            kl_k3(logp, batch["ref_logprobs"]),
            mask,
            normalisation=config.normalisation,
            reduction="sum",
        )
        loss = loss + kl_coef * kl_term
        metrics["kl_loss"] = kl_term / denominator
    return loss, metrics


def ppo_epochs(
    loss_fn: Callable[[PyTree, Mapping[str, Array], Array], tuple[Array, Metrics]],
    tx: optax.GradientTransformation,
    state: TrainState,
    data: Mapping[str, Array],
    rng: Array,
    *,
    config: PPOUpdateConfig,
) -> tuple[TrainState, Metrics]:
    """``epochs × num_minibatches`` guarded gradient steps on a fixed rollout.

    Epoch ``e`` visits the rows in the permutation drawn from ``fold_in(rng, e)``. Each
    minibatch's gradient is the batch-mean of ``loss_fn`` (a summed loss) accumulated over
    ``num_micro_batches`` (:func:`rlhf_jax.train.state.accumulate_gradients`), and the
    update is skipped when the loss or gradient is non-finite.

    Args:
      loss_fn: ``loss_fn(params, micro_batch, rng) -> (Σ loss, metrics)``.
      tx: the optax transformation of ``state.opt_state``.
      state: the training state.
      data: the rollout, arrays ``[B, ...]``.
      rng: key of the update.
      config: epochs and minibatch sizes.

    Returns:
      ``(state, metrics)``: metrics averaged over every minibatch step, ``nonfinite``
      true when any step was skipped, ``grad_norm`` the mean norm.
    """
    size = jax.tree.leaves(data)[0].shape[0]
    rows_per_step = config.num_minibatches * config.num_micro_batches
    if size % rows_per_step:
        raise ValueError(
            f"rollout of {size} rows is not divisible by num_minibatches × num_micro_batches "
            f"= {config.num_minibatches} × {config.num_micro_batches}"
        )
    minibatch_size = size // config.num_minibatches
    micro_size = minibatch_size // config.num_micro_batches

    def minibatch_step(state: TrainState, inputs: tuple[Array, Array]):
        rows, key = inputs
        micro_batches = jax.tree.map(
            lambda x: x[rows].reshape(config.num_micro_batches, micro_size, *x.shape[1:]), data
        )
        loss, grads, metrics = accumulate_gradients(loss_fn, state.params, micro_batches, key)
        state, guard = state.apply_finite_gradients(grads, tx, loss=loss)
        metrics = {k: v for k, v in metrics.items() if k != "denominator"}
        return state, {**metrics, **guard, "loss": loss}

    def epoch(state: TrainState, index: Array):
        key = jax.random.fold_in(rng, index)
        order = jax.random.permutation(key, size).reshape(config.num_minibatches, minibatch_size)
        keys = jax.random.split(jax.random.fold_in(key, 1), config.num_minibatches)
        return jax.lax.scan(minibatch_step, state, (order, keys))

    state, per_step = jax.lax.scan(epoch, state, jnp.arange(config.epochs))
    metrics = {k: jnp.mean(v.astype(jnp.float32)) for k, v in per_step.items() if k != "nonfinite"}
    metrics["nonfinite"] = jnp.any(per_step["nonfinite"])
    return state, metrics


def rollout_metrics(output: SampleOutput, eos_id: int | None) -> Metrics:
    """Response length and the share of rows that ended with ``eos_id``."""
    mask = output.response_mask
    metrics = {"response_length": jnp.mean(jnp.sum(mask, axis=1).astype(jnp.float32))}
    if eos_id is not None:
        ended = jnp.any((output.tokens == eos_id) & (mask > 0), axis=1)
        metrics["eos_fraction"] = jnp.mean(ended.astype(jnp.float32))
    return metrics
