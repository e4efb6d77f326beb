"""The Safe-RLHF step: PPO-Lagrangian with a reward critic, a cost critic and a multiplier λ.

Dai et al. (2023), "Safe RLHF: Safe Reinforcement Learning from Human Feedback", §3.3:
``max_θ J_R(θ)  s.t.  J_C(θ) ≤ d`` is solved through the Lagrangian
``min_θ max_{λ≥0} −J_R(θ) + λ (J_C(θ) − d)``. One call of the step:

1. samples ``y ~ π_θ`` for a batch of prompts and scores it with the frozen reward model
   ``R`` and cost model ``C`` (at the last response token);
2. moves λ by dual ascent on the batch's episode cost ``Ĵ_C = mean_b C(x_b, y_b)``:
   ``λ ← max(0, λ + α (Ĵ_C − d))``, or in log space ``ln λ ← ln λ + α λ (Ĵ_C − d)``
   (Dai et al., 2023, Appendix, eq. 31), and uses the new λ for this rollout, as the
   authors' released implementation does;
3. forms per-token rewards and costs with the KL penalty on both,
   ``r_t = R·1[t = T] − β k_t`` and ``c_t = C·1[t = T] + β k_t`` (as the PKU-Alignment
   Safe-RLHF trainers do), so that the combination below carries exactly ``−β k_t``
   whatever λ (``−β (1 + λ) k_t`` with ``normalise_advantages=False``);
4. GAE advantages ``A_r`` and ``A_c`` from the reward and the cost critic, combined into
   ``(A_r − λ A_c) / (1 + λ)`` (§3.3; ``normalise_advantages=False`` drops the ``1 + λ``);
5. PPO epochs on the clipped surrogate of the combined advantage plus both critics'
   value losses.

``cost_bound="pessimistic"`` turns the step into the candidate selection of HC-RLHF
(Chittepu et al., 2025, "Reinforcement Learning from Human Feedback with High-Confidence
Safety Constraints"): the dual step uses the inflated Student-t upper bound ``U_cand`` of
the batch's costs (:func:`rlhf_jax.objectives.hc_rlhf.pessimistic_cost_bound`) in place
of ``Ĵ_C``, and the cost critic learns the per-sample costs
``c̃ = c + κ (c² − 2 μ c) / (2σ)`` whose policy gradient is that of ``μ + κ σ``
(:func:`rlhf_jax.objectives.hc_rlhf.pessimistic_cost_per_sample`, κ the bound's total
width coefficient), so the policy is pushed to lower the spread of its costs as well as
their mean. The safety test on held-out data is the caller's (it needs fresh samples).

``state.params = {"policy", "reward_value", "cost_value"}`` (a decoder and two
:class:`rlhf_jax.models.ScalarModel` critics, as in the paper); ``state.extra`` holds the
frozen ``reference_params``, ``reward_params``, ``cost_params``, the KL coefficient
``kl_coef`` and the multiplier: ``lagrange_multiplier`` (λ) or, with
``log_multiplier=True``, ``log_lagrange_multiplier`` (ln λ).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import Array

from rlhf_jax.models.logprobs import response_logprobs
from rlhf_jax.objectives.advantages import gae_advantages
from rlhf_jax.objectives.hc_rlhf import (
    pessimistic_cost_bound,
    pessimistic_cost_per_sample,
    student_t_upper_quantile,
)
from rlhf_jax.objectives.kl import kl_estimate, kl_penalised_rewards
from rlhf_jax.objectives.safe_rlhf import (
    lagrange_multiplier_update,
    log_lagrange_multiplier_update,
    safe_rlhf_advantages,
)
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train.state import Metrics, PyTree, TrainState
from rlhf_jax.train.steps.common import StepFn
from rlhf_jax.train.steps.ppo import PROMPT_KEYS, update_kl_coef
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

CRITICS = ("reward", "cost")
COST_BOUNDS = ("mean", "pessimistic")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SafeRLHFConfig:
    """Static settings of the Safe-RLHF step.

    Attributes:
      sampling: the rollout sampler's settings.
      update: PPO update hyper-parameters; ``whiten_advantages`` standardises the
        combined advantage.
      cost_threshold: d, the bound on the expected cost.
      multiplier_lr: α, the dual step size.
      log_multiplier: update ln λ (eq. 31) instead of λ.
      normalise_advantages: divide the combined advantage by ``1 + λ`` (§3.3).
      kl_target: target sequence KL of the adaptive KL controller; ``None`` keeps β fixed.
      kl_horizon: horizon of the adaptive KL controller.
      cost_bound: ``"mean"`` (Safe-RLHF: the batch's mean cost) or ``"pessimistic"``
        (HC-RLHF: the inflated upper confidence bound, see the module docstring).
      bound_delta: δ of the pessimistic bound.
      safety_size: n_s, the number of held-out safety samples the bound anticipates.
      candidate_coef: κ_c, weight of the batch's own confidence width.
      safety_coef: κ_s, weight of the predicted safety-test width.
    """

    sampling: SamplingConfig
    update: PPOUpdateConfig = dataclasses.field(
        default_factory=lambda: PPOUpdateConfig(whiten_advantages=False)
    )
    cost_threshold: float = 0.0
    multiplier_lr: float = 0.05
    log_multiplier: bool = False
    normalise_advantages: bool = True
    kl_target: float | None = None
    kl_horizon: float = 10000.0
    cost_bound: str = "mean"
    bound_delta: float = 0.1
    safety_size: int = 0
    candidate_coef: float = 0.0
    safety_coef: float = 2.0

    def __post_init__(self) -> None:
        if self.cost_bound not in COST_BOUNDS:
            raise ValueError(
                f"SafeRLHFConfig.cost_bound must be one of {COST_BOUNDS}, got {self.cost_bound!r}"
            )
        if self.cost_bound == "pessimistic":
            if self.safety_size < 2:
                raise ValueError(
                    "SafeRLHFConfig.safety_size must be >= 2 with cost_bound='pessimistic', "
                    f"got {self.safety_size}"
                )
            if not 0.0 < self.bound_delta < 0.5:
                raise ValueError(
                    f"SafeRLHFConfig.bound_delta must lie in (0, 0.5), got {self.bound_delta}"
                )


@dataclasses.dataclass(frozen=True)
class SafeRLHFModels:
    """Graph definitions: the policy (and reference) decoder and the scalar models.

    Attributes:
      policy: :class:`rlhf_jax.models.Decoder` graphdef of the policy and the reference.
      critic: :class:`rlhf_jax.models.ScalarModel` graphdef of both critics.
      reward: the frozen reward model's :class:`rlhf_jax.models.ScalarModel` graphdef.
      cost: the frozen cost model's :class:`rlhf_jax.models.ScalarModel` graphdef.
    """

    policy: nnx.GraphDef
    critic: nnx.GraphDef
    reward: nnx.GraphDef
    cost: nnx.GraphDef


def multiplier_key(config: SafeRLHFConfig) -> str:
    """The ``state.extra`` key of the stored multiplier (ln λ or λ)."""
    return "log_lagrange_multiplier" if config.log_multiplier else "lagrange_multiplier"


def init_safe_rlhf_extra(
    config: SafeRLHFConfig,
    *,
    reference_params: PyTree,
    reward_params: PyTree,
    cost_params: PyTree,
    kl_coef: float,
    multiplier: float,
) -> dict[str, Any]:
    """``state.extra`` of a Safe-RLHF run; ``multiplier`` is λ₀ (> 0 when log-parameterised)."""
    if config.log_multiplier and multiplier <= 0.0:
        raise ValueError(f"a log-parameterised multiplier needs λ₀ > 0, got {multiplier}")
    value = math.log(multiplier) if config.log_multiplier else multiplier
    return {
        "reference_params": reference_params,
        "reward_params": reward_params,
        "cost_params": cost_params,
        "kl_coef": jnp.asarray(kl_coef, jnp.float32),
        multiplier_key(config): jnp.asarray(value, jnp.float32),
    }


def multiplier_value(extra: Mapping[str, Array], config: SafeRLHFConfig) -> Array:
    """λ from ``state.extra`` under either parameterisation."""
    stored = extra[multiplier_key(config)]
    return jnp.exp(stored) if config.log_multiplier else stored


def updated_multiplier(stored: Array, episode_cost: Array, config: SafeRLHFConfig) -> Array:
    """One dual-ascent step of the stored multiplier (λ or ln λ) on ``Ĵ_C − d``."""
    update = log_lagrange_multiplier_update if config.log_multiplier else lagrange_multiplier_update
    return update(
        stored, episode_cost, threshold=config.cost_threshold, learning_rate=config.multiplier_lr
    )


def constraint_costs(cost_scores: Array, config: SafeRLHFConfig) -> tuple[Array, Array]:
    """The cost the dual step compares with d, and the per-sample costs the critic learns.

    ``"mean"``: ``(mean_b C_b, C)``. ``"pessimistic"``: ``(U_cand, c̃)`` with
    ``U_cand = ĉ + s (κ_c t_{1−δ, n−1}/√n + κ_s t_{1−δ, n_s−1}/√n_s)`` over the ``n``
    rollout costs and ``c̃`` the per-sample costs of
    :func:`rlhf_jax.objectives.hc_rlhf.pessimistic_cost_per_sample` with that width
    coefficient (Chittepu et al., 2025).

    Args:
      cost_scores: ``[B]`` cost-model scores of the rollout.
      config: gives ``cost_bound`` and the bound's settings.

    Returns:
      ``(bound, per_sample_costs)``: a scalar and ``[B]``.
    """
    chex.assert_rank(cost_scores, 1)
    if config.cost_bound == "mean":
        return jnp.mean(cost_scores), cost_scores
    bound = pessimistic_cost_bound(
        cost_scores,
        delta=config.bound_delta,
        safety_size=config.safety_size,
        candidate_coef=config.candidate_coef,
        safety_coef=config.safety_coef,
    )
    width = (
        config.safety_coef
        * student_t_upper_quantile(config.bound_delta, config.safety_size - 1.0)
        / math.sqrt(config.safety_size)
    )
    count = cost_scores.shape[0]
    if config.candidate_coef:
        width = width + config.candidate_coef * student_t_upper_quantile(
            config.bound_delta, count - 1.0
        ) / math.sqrt(count)
    return bound, pessimistic_cost_per_sample(cost_scores, coef=width)


def token_rewards_and_costs(
    reward_scores: Array,
    cost_scores: Array,
    logprobs: Array,
    ref_logprobs: Array,
    response_mask: Array,
    kl_coef: Array,
    update: PPOUpdateConfig,
) -> dict[str, Array]:
    """Per-token rewards and costs ``[B, L]`` with the KL penalty on both (step 3 above).

    ``r_t = R·1[t = T] − β k_t`` and ``c_t = C·1[t = T] + β k_t`` with ``kl_mode="reward"``;
    with ``kl_mode="loss"`` the scores alone, on the last response token.

    Returns:
      ``{"reward": r, "cost": c}``.
    """
    reward_kl_coef = kl_coef if update.kl_mode == "reward" else 0.0
    return {
        name: kl_penalised_rewards(
            scores,
            logprobs,
            ref_logprobs,
            response_mask,
            kl_coef=sign * reward_kl_coef,
            estimator=update.kl_estimator,
        )
        for name, scores, sign in (("reward", reward_scores, 1.0), ("cost", cost_scores, -1.0))
    }


def safe_actor_critic_forward(models: SafeRLHFModels) -> ActorCriticFn:
    """``forward(params, tokens, mask) -> (logits, {"reward": V_r, "cost": V_c})``."""

    def forward(params: PyTree, tokens: Array, attention_mask: Array):
        logits, _ = nnx.merge(models.policy, params["policy"])(
            tokens, attention_mask=attention_mask
        )
        values = {
            name: nnx.merge(models.critic, params[f"{name}_value"])(
                tokens, attention_mask=attention_mask
            )
            for name in CRITICS
        }
        return logits, values

    return forward


def make_safe_rlhf_step(
    models: SafeRLHFModels, tx: optax.GradientTransformation, config: SafeRLHFConfig
) -> StepFn:
    """The pure Safe-RLHF iteration ``step(state, prompts, rng) -> (state, metrics)``.

    Args:
      models: the graph definitions (static).
      tx: the optax transformation of ``state.opt_state`` (policy and both critics).
      config: static settings.

    Returns:
      The step. ``prompts`` holds left-padded ``input_ids`` and ``attention_mask``.
      Metrics: ``reward_score``, ``cost_score`` (the episode cost Ĵ_C), ``cost_bound``
      (the cost of the dual step: Ĵ_C, or U_cand when pessimistic), ``lambda`` (λ used
      for this rollout, after its update), ``kl``, ``kl_coef``, ``response_length``,
      ``eos_fraction``, the loss terms, ``loss``, ``grad_norm``, ``nonfinite``.
    """
    forward = safe_actor_critic_forward(models)
    update = config.update
    key = multiplier_key(config)

    def step(
        state: TrainState, prompts: Mapping[str, Array], rng: Array
    ) -> tuple[TrainState, Metrics]:
        sample_key, update_key = jax.random.split(rng)
        output = generate(
            models.policy,
            state.params["policy"],
            {k: prompts[k] for k in PROMPT_KEYS},
            sample_key,
            sampling=config.sampling,
        )
        tokens, attention_mask, mask = output.tokens, output.attention_mask, output.response_mask
        extra = state.extra
        logits, scalars = forward(jax.lax.stop_gradient(state.params), tokens, attention_mask)
        old_logprobs, _ = response_logprobs(logits, tokens, mask)
        ref_logprobs = frozen_token_logprobs(
            models.policy, extra["reference_params"], tokens, attention_mask, mask
        )
        reward_scores = sequence_scores(
            models.reward, extra["reward_params"], tokens, attention_mask
        )
        cost_scores = sequence_scores(models.cost, extra["cost_params"], tokens, attention_mask)
        bound, per_sample_costs = constraint_costs(cost_scores, config)
        stored = updated_multiplier(extra[key], bound, config)
        multiplier = jnp.exp(stored) if config.log_multiplier else stored

        kl_coef = extra["kl_coef"]
        per_token = token_rewards_and_costs(
            reward_scores, per_sample_costs, old_logprobs, ref_logprobs, mask, kl_coef, update
        )
        data = {
            "tokens": tokens,
            "attention_mask": attention_mask,
            "response_mask": mask,
            "old_logprobs": old_logprobs,
            "ref_logprobs": ref_logprobs,
        }
        advantages = {}
        for name in CRITICS:
            old_values = state_values(scalars[name], mask)
            advantages[name], data[f"{name}_returns"] = gae_advantages(
                per_token[name], old_values, mask, gamma=update.gamma, lam=update.lam
            )
            data[f"{name}_old_values"] = old_values
        combined = safe_rlhf_advantages(
            advantages["reward"],
            advantages["cost"],
            multiplier,
            normalise=config.normalise_advantages,
        )
        data["advantages"] = whiten(combined, mask) if update.whiten_advantages else combined
        loss_fn = actor_critic_sum_loss(forward, CRITICS, update, kl_coef)
        state, metrics = ppo_epochs(loss_fn, tx, state, data, update_key, config=update)

        per_token_kl = kl_estimate(old_logprobs, ref_logprobs, estimator=update.kl_estimator)
        mean_kl = jnp.mean(jnp.sum(per_token_kl * mask, axis=1))
        new_extra = {
            **extra,
            key: stored,
            "kl_coef": update_kl_coef(
                kl_coef,
                mean_kl,
                target=config.kl_target,
                horizon=config.kl_horizon,
                batch_size=tokens.shape[0],
            ),
        }
        metrics = {
            **metrics,
            **rollout_metrics(output, config.sampling.eos_id),
            "reward_score": jnp.mean(reward_scores),
            "cost_score": jnp.mean(cost_scores),
            "cost_bound": bound,
            "lambda": multiplier,
            "kl": mean_kl,
            "kl_coef": kl_coef,
        }
        return state.replace(extra=new_extra), metrics

    return step
