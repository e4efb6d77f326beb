"""The PPO step for RLHF: one iteration of rollout, scoring, GAE and clipped updates.

One call of the step (Ouyang et al., 2022, §3.5; Ziegler et al., 2019, §2.2; Schulman et
al., 2017, Algorithm 1):

1. sample ``y ~ π_θ(·|x)`` for a batch of left-padded prompts with the KV-cache sampler;
2. score ``R(x, y)`` with the frozen reward model at the last response token, and compute
   the per-token log-probs of the policy (``π_old``), of the frozen reference and the
   values of the critic on the rollout;
3. per-token rewards ``r_t = −β k(log π_old, log π_ref)_t`` plus ``R`` on the last response
   token (``kl_mode="reward"``, Ziegler et al., 2019), or ``R`` alone with ``β·k3`` added
   to the loss (``kl_mode="loss"``);
4. GAE advantages and returns (Schulman et al., 2016, eq. 16), optionally whitened;
5. ``epochs × num_minibatches`` steps on ``L^CLIP + c₁ L^VF − c₂ H`` (Schulman et al.,
   2017, eq. 9);
6. the KL coefficient β follows the adaptive controller of Ziegler et al. (2019) on the
   rollout's mean sequence KL (or stays fixed).

The critic is either a value head on the policy's trunk
(:class:`rlhf_jax.models.PolicyWithValueHead`, ``shared_critic=True``; ``state.params`` is
that module's state, with keys ``policy`` and ``value_head``) or a separate
:class:`rlhf_jax.models.ScalarModel` (``state.params = {"policy": ..., "value": ...}``).
Either way ``state.params["policy"]`` are the decoder parameters the sampler uses. The
ratio's ``π_old`` is the policy's own distribution (a forward pass at temperature 1 on
the rollout), not the sampler's tempered or filtered one. The
frozen models live in ``state.extra`` (``reference_params``, ``reward_params``) beside the
KL coefficient ``kl_coef``, so the step is a pure function of its arguments and compiles
once.

The iteration is assembled from pieces that other online steps reuse:
:func:`sample_rollout` (steps 1–2), :func:`token_rewards`, :func:`rollout_data` (the
arrays of the update epochs) and :func:`finish_iteration` (step 6 and the metrics); the
MA-RLHF and fine-grained RLHF steps replace the advantages, the loss or the rewards in
between. With one epoch of one minibatch, :func:`single_pass_update` takes π_old and the
old values from the update's own forward pass instead of a separate one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import Array

from rlhf_jax.models.logprobs import response_logprobs
from rlhf_jax.objectives.advantages import gae_advantages
from rlhf_jax.objectives.kl import kl_estimate, kl_penalised_rewards
from rlhf_jax.objectives.kl_control import KLControllerState, adaptive_kl_update
from rlhf_jax.sampling import SampleOutput, SamplingConfig
from rlhf_jax.train.state import Metrics, PyTree, TrainState
from rlhf_jax.train.steps.common import StepFn
from rlhf_jax.train.steps.rollout import (
    ActorCriticFn,
    PPOUpdateConfig,
    actor_critic_loss,
    actor_critic_sum_loss,
    frozen_token_logprobs,
    generate,
    ppo_epochs,
    rollout_metrics,
    sequence_scores,
    state_values,
    whiten,
)

PROMPT_KEYS = ("input_ids", "attention_mask")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """Static settings of the PPO step.

    Attributes:
      sampling: the rollout sampler's settings.
      update: the PPO update's hyper-parameters (epochs, clipping, GAE, KL placement).
      kl_target: target sequence KL of the adaptive controller; ``None`` keeps β fixed.
      kl_horizon: horizon H of the adaptive controller (Ziegler et al., 2019).
    """

    sampling: SamplingConfig
    update: PPOUpdateConfig = dataclasses.field(default_factory=PPOUpdateConfig)
    kl_target: float | None = None
    kl_horizon: float = 10000.0


@dataclasses.dataclass(frozen=True)
class PPOModels:
    """Graph definitions of the models a PPO step merges with parameters.

    Attributes:
      policy: the policy's :class:`rlhf_jax.models.Decoder` graphdef (also the
        reference's).
      critic: the critic's graphdef: a :class:`rlhf_jax.models.PolicyWithValueHead` when
        ``shared_critic``, else a :class:`rlhf_jax.models.ScalarModel`.
      reward: the frozen reward model's :class:`rlhf_jax.models.ScalarModel` graphdef.
      shared_critic: whether the value head shares the policy's trunk.
    """

    policy: nnx.GraphDef
    critic: nnx.GraphDef
    reward: nnx.GraphDef
    shared_critic: bool


def actor_critic_forward(models: PPOModels) -> ActorCriticFn:
    """``forward(params, tokens, mask) -> (logits, {"reward": per-token values})``."""

    def forward(params: PyTree, tokens: Array, attention_mask: Array):
        if models.shared_critic:
            logits, values = nnx.merge(models.critic, params)(tokens, attention_mask=attention_mask)
            return logits, {"reward": values}
        logits, _ = nnx.merge(models.policy, params["policy"])(
            tokens, attention_mask=attention_mask
        )
        critic = nnx.merge(models.critic, params["value"])
        return logits, {"reward": critic(tokens, attention_mask=attention_mask)}

    return forward


def init_ppo_extra(
    *, reference_params: PyTree, reward_params: PyTree, kl_coef: float
) -> dict[str, Any]:
    """``state.extra`` of a PPO run: the frozen reference and reward model, and β."""
    return {
        "reference_params": reference_params,
        "reward_params": reward_params,
        "kl_coef": jnp.asarray(kl_coef, jnp.float32),
    }


def update_kl_coef(
    kl_coef: Array, observed_kl: Array, *, target: float | None, horizon: float, batch_size: int
) -> Array:
    """The adaptive controller's next β (Ziegler et al., 2019), or β itself when ``target`` is None.

    Args:
      kl_coef: the current β.
      observed_kl: the rollout's mean sequence KL.
      target: KL_target, or ``None`` for a fixed β.
      horizon: the controller's horizon H.
      batch_size: sequences in the rollout (``n`` of ``K_β = n / H``).

    Returns:
      The next β.
    """
    if target is None:
        return kl_coef
    controller = adaptive_kl_update(
        KLControllerState(kl_coef=kl_coef),
        observed_kl,
        target=target,
        horizon=horizon,
        n_steps=batch_size,
    )
    return controller.kl_coef


def token_rewards(
    scores: Array,
    logprobs: Array,
    ref_logprobs: Array,
    response_mask: Array,
    kl_coef: Array,
    update: PPOUpdateConfig,
) -> Array:
    """Per-token rewards ``[B, L]`` of a rollout.

    ``kl_mode="reward"``: ``r_t = −β k(log π_t, log π_ref,t)`` on every response token plus
    the score ``R`` on the last one (Ziegler et al., 2019, §2.2); ``kl_mode="loss"``: ``R``
    on the last response token only (the KL then enters the loss).

    Args:
      scores: ``[B]`` reward-model scores.
      logprobs: ``[B, L]`` per-token log-probs of the sampling policy.
      ref_logprobs: ``[B, L]`` per-token log-probs of the reference.
      response_mask: ``[B, L]``.
      kl_coef: β.
      update: gives ``kl_mode`` and ``kl_estimator``.

    Returns:
      ``[B, L]`` rewards, 0 outside the response.
    """
    return kl_penalised_rewards(
        scores,
        logprobs,
        ref_logprobs,
        response_mask,
        kl_coef=kl_coef if update.kl_mode == "reward" else 0.0,
        estimator=update.kl_estimator,
    )


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One rollout of the policy and what the update needs from it (all constants).

    Attributes:
      output: the sampler's output (``tokens``, ``attention_mask``, ``response_mask``).
      old_logprobs: ``[B, L]`` per-token log-probs of the sampling policy (temperature 1).
      ref_logprobs: ``[B, L]`` per-token log-probs of the frozen reference.
      old_values: ``[B, L]`` the critic's values aligned with the tokens.
      scores: ``[B]`` reward-model scores at the last real token.
    """

    output: SampleOutput
    old_logprobs: Array
    ref_logprobs: Array
    old_values: Array
    scores: Array


def sample_rollout(
    models: PPOModels,
    forward: ActorCriticFn,
    state: TrainState,
    prompts: Mapping[str, Array],
    rng: Array,
    *,
    sampling: SamplingConfig,
) -> Rollout:
    """Steps 1–2 of the iteration: sample ``y ~ π_θ``, score it, and evaluate π_old, π_ref, V.

    Args:
      models: the graph definitions.
      forward: :func:`actor_critic_forward` of ``models``.
      state: the training state (policy and critic in ``params``, frozen models in
        ``extra``).
      prompts: left-padded ``input_ids`` and ``attention_mask`` ``[B, P]``.
      rng: key of the sampler.
      sampling: the sampler's settings.

    Returns:
      The :class:`Rollout`.
    """
    output, ref_logprobs, scores = sample_and_score(models, state, prompts, rng, sampling=sampling)
    mask = output.response_mask
    logits, scalars = forward(
        jax.lax.stop_gradient(state.params), output.tokens, output.attention_mask
    )
    old_logprobs, _ = response_logprobs(logits, output.tokens, mask)
    return Rollout(
        output=output,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        old_values=state_values(scalars["reward"], mask),
        scores=scores,
    )


def sample_and_score(
    models: PPOModels,
    state: TrainState,
    prompts: Mapping[str, Array],
    rng: Array,
    *,
    sampling: SamplingConfig,
) -> tuple[SampleOutput, Array, Array]:
    """Sample ``y ~ π_θ`` and evaluate the frozen models on it: ``(output, log π_ref, R)``.

    Args:
      models: the graph definitions.
      state: the training state (frozen models in ``extra``).
      prompts: left-padded ``input_ids`` and ``attention_mask`` ``[B, P]``.
      rng: key of the sampler.
      sampling: the sampler's settings.

    Returns:
      The sampler's output, the reference's per-token log-probs ``[B, L]`` and the
      reward model's scores ``[B]``.
    """
    output = generate(
        models.policy,
        state.params["policy"],
        {k: prompts[k] for k in PROMPT_KEYS},
        rng,
        sampling=sampling,
    )
    tokens, attention_mask, mask = output.tokens, output.attention_mask, output.response_mask
    ref_logprobs = frozen_token_logprobs(
        models.policy, state.extra["reference_params"], tokens, attention_mask, mask
    )
    scores = sequence_scores(models.reward, state.extra["reward_params"], tokens, attention_mask)
    return output, ref_logprobs, scores


def advantage_data(
    rollout: Rollout, kl_coef: Array, update: PPOUpdateConfig
) -> tuple[Array, dict[str, Array]]:
    """Steps 3–4: per-token rewards, GAE (optionally whitened), and the update's arrays.

    Returns:
      ``(rewards [B, L], data)`` with ``data`` as :func:`rollout_data` gives it.
    """
    mask = rollout.output.response_mask
    rewards = token_rewards(
        rollout.scores, rollout.old_logprobs, rollout.ref_logprobs, mask, kl_coef, update
    )
    advantages, returns = gae_advantages(
        rewards, rollout.old_values, mask, gamma=update.gamma, lam=update.lam
    )
    if update.whiten_advantages:
        advantages = whiten(advantages, mask)
    return rewards, rollout_data(rollout, advantages, returns)


def single_pass_update(
    forward: ActorCriticFn,
    tx: optax.GradientTransformation,
    state: TrainState,
    output: SampleOutput,
    ref_logprobs: Array,
    scores: Array,
    update: PPOUpdateConfig,
) -> tuple[TrainState, Metrics, Rollout, Array]:
    """Steps 3–5 when the update is one pass over the whole rollout, sharing its forward pass.

    With one epoch of one minibatch (and one micro-batch) the only gradient step is taken
    at ``θ = θ_old``, so ``π_old`` and ``V_old`` are the update's own forward pass under a
    stop-gradient: ``log π_old = sg(log π_θ)``, ``V_old = sg(V_θ)`` (the ratio is 1 with
    gradient ``∇ log π_θ``). Rewards, GAE and whitening are computed from these inside the
    loss, so the iteration needs no separate π_old/value forward pass, and the result is
    the :func:`ppo_epochs` update on a :func:`sample_rollout` rollout up to float rounding.

    Args:
      forward: :func:`actor_critic_forward`.
      tx: the optax transformation of ``state.opt_state``.
      state: the training state.
      output: the sampler's output.
      ref_logprobs: ``[B, L]`` the reference's per-token log-probs.
      scores: ``[B]`` the reward model's scores.
      update: the update's hyper-parameters (``epochs = num_minibatches =
        num_micro_batches = 1``).

    Returns:
      ``(state, metrics, rollout, rewards)`` as the multi-pass path produces them.

    Raises:
      ValueError: when ``update`` takes more than one pass (use :func:`ppo_epochs`).
    """
    if not update.epochs == update.num_minibatches == update.num_micro_batches == 1:
        raise ValueError(
            "single_pass_update needs epochs = num_minibatches = num_micro_batches = 1, got "
            f"{update.epochs}, {update.num_minibatches}, {update.num_micro_batches}"
        )
    kl_coef = state.extra["kl_coef"]
    tokens, attention_mask, mask = output.tokens, output.attention_mask, output.response_mask

    def loss_fn(params: PyTree) -> tuple[Array, tuple[Metrics, Array, Array, Array]]:
        logits, scalars = forward(params, tokens, attention_mask)
        old_logprobs, _ = response_logprobs(jax.lax.stop_gradient(logits), tokens, mask)
        old_values = state_values(jax.lax.stop_gradient(scalars["reward"]), mask)
        rollout = Rollout(output, old_logprobs, ref_logprobs, old_values, scores)
        rewards, data = advantage_data(rollout, kl_coef, update)
        loss, metrics = actor_critic_loss(logits, scalars, data, ("reward",), update, kl_coef)
        denominator = jnp.maximum(metrics.pop("denominator"), jnp.finfo(jnp.float32).tiny)
        return loss / denominator, (metrics, old_logprobs, old_values, rewards)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics, old_logprobs, old_values, rewards = aux
    state, guard = state.apply_finite_gradients(grads, tx, loss=loss)
    metrics = {k: v.astype(jnp.float32) for k, v in metrics.items()}
    rollout = Rollout(output, old_logprobs, ref_logprobs, old_values, scores)
    return state, {**metrics, **guard, "loss": loss}, rollout, rewards


def rollout_data(rollout: Rollout, advantages: Array, returns: Array) -> dict[str, Array]:
    """The arrays the PPO epochs iterate over (the keys of :func:`actor_critic_sum_loss`)."""
    output = rollout.output
    return {
        "tokens": output.tokens,
        "attention_mask": output.attention_mask,
        "response_mask": output.response_mask,
        "old_logprobs": rollout.old_logprobs,
        "ref_logprobs": rollout.ref_logprobs,
        "advantages": advantages,
        "reward_old_values": rollout.old_values,
        "reward_returns": returns,
    }


def finish_iteration(
    state: TrainState,
    metrics: Metrics,
    rollout: Rollout,
    rewards: Array,
    config: PPOConfig,
) -> tuple[TrainState, Metrics]:
    """Step 6 and the metrics: move β by the adaptive controller on the rollout's KL.

    Args:
      state: the state after the update epochs.
      metrics: the update's metrics.
      rollout: the iteration's rollout.
      rewards: ``[B, L]`` per-token rewards of the rollout.
      config: static settings.

    Returns:
      The state with the next β in ``extra["kl_coef"]`` and the iteration's metrics.
    """
    mask = rollout.output.response_mask
    kl_coef = state.extra["kl_coef"]
    per_token_kl = kl_estimate(
        rollout.old_logprobs, rollout.ref_logprobs, estimator=config.update.kl_estimator
    )
    mean_kl = jnp.mean(jnp.sum(per_token_kl * mask, axis=1))
    new_extra = {
        **state.extra,
        "kl_coef": update_kl_coef(
            kl_coef,
            mean_kl,
            target=config.kl_target,
            horizon=config.kl_horizon,
            batch_size=mask.shape[0],
        ),
    }
    metrics = {
        **metrics,
        **rollout_metrics(rollout.output, config.sampling.eos_id),
        "reward_score": jnp.mean(rollout.scores),
        "kl": mean_kl,
        "kl_coef": kl_coef,
        "non_score_reward": jnp.mean(jnp.sum(rewards, axis=1) - rollout.scores),
    }
    return state.replace(extra=new_extra), metrics


def make_ppo_step(models: PPOModels, tx: optax.GradientTransformation, config: PPOConfig) -> StepFn:
    """The pure PPO iteration ``step(state, prompts, rng) -> (state, metrics)``.

    Args:
      models: the graph definitions (static).
      tx: the optax transformation of ``state.opt_state`` (policy and critic together).
      config: static settings.

    Returns:
      The step. ``prompts`` holds left-padded ``input_ids`` and ``attention_mask``
      ``[B, P]``. With one epoch of one minibatch and one micro-batch the update shares
      its forward pass with π_old and the old values (:func:`single_pass_update`).
      Metrics: ``reward_score`` (mean reward-model score), ``kl`` (mean
      sequence KL to the reference under the configured estimator), ``kl_coef`` (β used
      for this rollout), ``non_score_reward`` (mean ``Σ_t r_t − R``), ``response_length``,
      ``eos_fraction``, the loss terms, ``clip_fraction``, ``approx_kl``, ``loss``,
      ``grad_norm`` and ``nonfinite``.
    """
    forward = actor_critic_forward(models)
    update = config.update
    single_pass = update.epochs == update.num_minibatches == update.num_micro_batches == 1

    def step(
        state: TrainState, prompts: Mapping[str, Array], rng: Array
    ) -> tuple[TrainState, Metrics]:
        sample_key, update_key = jax.random.split(rng)
        kl_coef = state.extra["kl_coef"]
        if single_pass:
            output, ref_logprobs, scores = sample_and_score(
                models, state, prompts, sample_key, sampling=config.sampling
            )
            state, metrics, rollout, rewards = single_pass_update(
                forward, tx, state, output, ref_logprobs, scores, update
            )
            return finish_iteration(state, metrics, rollout, rewards, config)
        rollout = sample_rollout(
            models, forward, state, prompts, sample_key, sampling=config.sampling
        )
        rewards, data = advantage_data(rollout, kl_coef, update)
        loss_fn = actor_critic_sum_loss(forward, ("reward",), update, kl_coef)
        state, metrics = ppo_epochs(loss_fn, tx, state, data, update_key, config=update)
        return finish_iteration(state, metrics, rollout, rewards, config)

    return step
