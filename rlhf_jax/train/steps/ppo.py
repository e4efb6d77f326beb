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
between.
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
    output = generate(
        models.policy,
        state.params["policy"],
        {k: prompts[k] for k in PROMPT_KEYS},
        rng,
        sampling=sampling,
    )
    tokens, attention_mask, mask = output.tokens, output.attention_mask, output.response_mask
    logits, scalars = forward(jax.lax.stop_gradient(state.params), tokens, attention_mask)
    old_logprobs, _ = response_logprobs(logits, tokens, mask)
    return Rollout(
        output=output,
        old_logprobs=old_logprobs,
        ref_logprobs=frozen_token_logprobs(
            models.policy, state.extra["reference_params"], tokens, attention_mask, mask
        ),
        old_values=state_values(scalars["reward"], mask),
        scores=sequence_scores(models.reward, state.extra["reward_params"], tokens, attention_mask),
    )


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
      ``[B, P]``. Metrics: ``reward_score`` (mean reward-model score), ``kl`` (mean
      sequence KL to the reference under the configured estimator), ``kl_coef`` (β used
      for this rollout), ``non_score_reward`` (mean ``Σ_t r_t − R``), ``response_length``,
      ``eos_fraction``, the loss terms, ``clip_fraction``, ``approx_kl``, ``loss``,
      ``grad_norm`` and ``nonfinite``.
    """
    forward = actor_critic_forward(models)
    update = config.update

    def step(
        state: TrainState, prompts: Mapping[str, Array], rng: Array
    ) -> tuple[TrainState, Metrics]:
        sample_key, update_key = jax.random.split(rng)
        rollout = sample_rollout(
            models, forward, state, prompts, sample_key, sampling=config.sampling
        )
        mask = rollout.output.response_mask
        kl_coef = state.extra["kl_coef"]
        rewards = token_rewards(
            rollout.scores, rollout.old_logprobs, rollout.ref_logprobs, mask, kl_coef, update
        )
        advantages, returns = gae_advantages(
            rewards, rollout.old_values, mask, gamma=update.gamma, lam=update.lam
        )
        if update.whiten_advantages:
            advantages = whiten(advantages, mask)
        loss_fn = actor_critic_sum_loss(forward, ("reward",), update, kl_coef)
        data = rollout_data(rollout, advantages, returns)
        state, metrics = ppo_epochs(loss_fn, tx, state, data, update_key, config=update)
        return finish_iteration(state, metrics, rollout, rewards, config)

    return step
