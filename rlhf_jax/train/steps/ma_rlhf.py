"""The MA-RLHF step: PPO whose actions are fixed-length macro actions (token n-grams).

Chai, Sun, Fang, Wang, Sun & Wu (2024), "MA-RLHF: Reinforcement Learning from Human
Feedback with Macro Actions", §3. One iteration is the PPO iteration of
:mod:`rlhf_jax.train.steps.ppo` (rollout, reward-model score, per-token rewards with the
KL penalty) with the advantage and the loss lifted to macro actions: the response is cut
into macros of ``macro_size`` consecutive tokens (the paper's n-gram termination; the
last macro may be shorter), and with ``R_τ = Σ_{t∈ω_τ} r_t`` and the macro value
``V_τ = V(s_{t_τ})``

    δ_τ = R_τ + γ V_{τ+1} − V_τ,   Â_τ = δ_τ + γλ Â_{τ+1},
    L = −mean_τ min(ρ_τ Â_τ, clip(ρ_τ, 1 − ε, 1 + ε) Â_τ) + c₁ L^VF,
    ρ_τ = Π_{t∈ω_τ} π_θ(a_t|s_t) / π_old(a_t|s_t)

(:func:`rlhf_jax.objectives.macro_actions.macro_gae_advantages` and
:func:`~rlhf_jax.objectives.macro_actions.macro_ppo_loss`). Whitening standardises the
macro advantages over the macros of the rollout. The per-token terms of the loss, the
entropy bonus and the ``β·k3`` KL of ``kl_mode="loss"``, are summed within each macro
(the entropy and KL of the macro step along the sampled path) and normalised like the
policy loss, over macros. With ``macro_size=1`` the step is exactly the token-level PPO
step. ``granularity="token"`` keeps per-token ratios with macro advantages (the authors'
released code, see :mod:`rlhf_jax.objectives.macro_actions`); the per-token terms are
then normalised over tokens.

``state.params`` and ``state.extra`` are those of the PPO step (``init_ppo_extra``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax import Array

from rlhf_jax.models.logprobs import response_logprobs
from rlhf_jax.objectives.kl import kl_k3
from rlhf_jax.objectives.macro_actions import (
    Granularity,
    ValueWeighting,
    fixed_length_macro_index,
    macro_gae_advantages,
    macro_mask,
    macro_ppo_loss,
    macro_sum,
)
from rlhf_jax.objectives.ppo import reduce_tokens, token_entropy
from rlhf_jax.train.state import Metrics, PyTree, TrainState
from rlhf_jax.train.steps.common import StepFn
from rlhf_jax.train.steps.ppo import (
    PPOConfig,
    PPOModels,
    actor_critic_forward,
    finish_iteration,
    rollout_data,
    sample_rollout,
    token_rewards,
)
from rlhf_jax.train.steps.rollout import (
    ActorCriticFn,
    ppo_epochs,
    predicting_logits,
    state_values,
    whiten,
)

GRANULARITIES = ("macro", "token")
VALUE_WEIGHTINGS = ("first", "mean", "last")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MARLHFConfig:
    """Static settings of the MA-RLHF step.

    Attributes:
      ppo: the PPO settings (sampler, update, KL controller).
      macro_size: n, tokens per macro action (1 is token-level PPO).
      value_weighting: the macro value from its tokens' values: ``"first"`` (the
        semi-Markov ``V(s_{t_τ})``), ``"mean"`` or ``"last"``.
      granularity: ``"macro"`` (one clipped ratio per macro, the paper) or ``"token"``.
    """

    ppo: PPOConfig
    macro_size: int = 4
    value_weighting: ValueWeighting = "first"
    granularity: Granularity = "macro"

    def __post_init__(self) -> None:
        if self.macro_size < 1:
            raise ValueError(f"MARLHFConfig.macro_size must be >= 1, got {self.macro_size}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"MARLHFConfig.granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if self.value_weighting not in VALUE_WEIGHTINGS:
            raise ValueError(
                f"MARLHFConfig.value_weighting must be one of {VALUE_WEIGHTINGS}, "
                f"got {self.value_weighting!r}"
            )


def macro_actor_critic_sum_loss(
    forward: ActorCriticFn, config: MARLHFConfig, kl_coef: Array
) -> Callable[[PyTree, Mapping[str, Array], Array], tuple[Array, Metrics]]:
    """``loss_fn(params, micro_batch, rng) -> (Σ loss, metrics)`` of MA-PPO.

    ``L = L^CLIP_macro + c₁ L^VF_macro − c₂ Σ_{t∈ω} H_t [+ β Σ_{t∈ω} k3_t]``, every term
    summed over steps (macros, or tokens with ``granularity="token"``) and normalised by
    one shared denominator. The micro-batch holds the keys of
    :func:`rlhf_jax.train.steps.ppo.rollout_data` (advantages and returns in macro
    slots) and ``macro_index``. Metrics report each term as a mean over the micro-batch.
    """
    update = config.ppo.update

    def loss_fn(params: PyTree, batch: Mapping[str, Array], rng: Array) -> tuple[Array, Metrics]:
        del rng
        mask, macro_index = batch["response_mask"], batch["macro_index"]
        logits, scalars = forward(params, batch["tokens"], batch["attention_mask"])
        logp, _ = response_logprobs(logits, batch["tokens"], mask)
        loss, metrics = macro_ppo_loss(
            logp,
            batch["old_logprobs"],
            batch["advantages"],
            state_values(scalars["reward"], mask),
            batch["reward_old_values"],
            batch["reward_returns"],
            macro_index,
            clip_eps=update.clip_eps,
            value_clip_eps=update.value_clip_eps,
            value_coef=update.value_coef,
            value_weighting=config.value_weighting,
            granularity=config.granularity,
            normalisation=update.normalisation,
            reduction="sum",
        )
        denominator = jnp.maximum(metrics["denominator"], 1.0)
        if config.granularity == "macro":
            steps, step_mask = (lambda x: macro_sum(x, macro_index)), macro_mask(macro_index)
        else:
            steps, step_mask = (lambda x: x), mask.astype(jnp.float32)

        def per_step_sum(per_token: Array) -> Array:
            total, _ = reduce_tokens(
                steps(per_token * mask),
                step_mask,
                normalisation=update.normalisation,
                reduction="sum",
            )
            return total

        metrics = {
            "denominator": metrics["denominator"],
            "policy_loss": metrics["policy_loss"] / denominator,
            "reward_value_loss": metrics["value_loss"] / denominator,
            "reward_value_clip_fraction": metrics["value_clip_fraction"],
            "clip_fraction": metrics["clip_fraction"],
            "approx_kl": metrics["approx_kl"],
            "ratio_mean": metrics["ratio_mean"],
        }
        if update.entropy_coef > 0.0:
            entropy_loss = -per_step_sum(token_entropy(predicting_logits(logits)))
            loss = loss + update.entropy_coef * entropy_loss
            metrics["entropy_loss"] = entropy_loss / denominator
        if update.kl_mode == "loss":
            kl_term = per_step_sum(kl_k3(logp, batch["ref_logprobs"]))
            loss = loss + kl_coef * kl_term
            metrics["kl_loss"] = kl_term / denominator
        return loss, metrics

    return loss_fn


def make_ma_rlhf_step(
    models: PPOModels, tx: optax.GradientTransformation, config: MARLHFConfig
) -> StepFn:
    """The pure MA-RLHF iteration ``step(state, prompts, rng) -> (state, metrics)``.

    Args:
      models: the PPO graph definitions (static).
      tx: the optax transformation of ``state.opt_state``.
      config: static settings.

    Returns:
      The step; its metrics are the PPO step's plus ``macros_per_response`` (the mean
      number of macro actions of a rollout response).
    """
    forward = actor_critic_forward(models)
    update = config.ppo.update

    def step(
        state: TrainState, prompts: Mapping[str, Array], rng: Array
    ) -> tuple[TrainState, Metrics]:
        sample_key, update_key = jax.random.split(rng)
        rollout = sample_rollout(
            models, forward, state, prompts, sample_key, sampling=config.ppo.sampling
        )
        mask = rollout.output.response_mask
        kl_coef = state.extra["kl_coef"]
        rewards = token_rewards(
            rollout.scores, rollout.old_logprobs, rollout.ref_logprobs, mask, kl_coef, update
        )
        macro_index = fixed_length_macro_index(mask, config.macro_size)
        advantages, returns = macro_gae_advantages(
            rewards,
            rollout.old_values,
            macro_index,
            gamma=update.gamma,
            lam=update.lam,
            value_weighting=config.value_weighting,
        )
        slots = macro_mask(macro_index)
        if update.whiten_advantages:
            advantages = whiten(advantages, slots)
        data = {**rollout_data(rollout, advantages, returns), "macro_index": macro_index}
        loss_fn = macro_actor_critic_sum_loss(forward, config, kl_coef)
        state, metrics = ppo_epochs(loss_fn, tx, state, data, update_key, config=update)
        state, metrics = finish_iteration(state, metrics, rollout, rewards, config.ppo)
        return state, {**metrics, "macros_per_response": jnp.mean(jnp.sum(slots, axis=1))}

    return step
