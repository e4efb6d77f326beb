"""Fine-grained RLHF steps: sentence-level dense reward models and PPO on their rewards.

Wu et al. (2023), "Fine-Grained Human Feedback Gives Better Rewards for Language Model
Training", §2, eq. 1. Several reward models ``k`` each score every segment ``j`` of a
response, and the PPO reward of token ``t`` is

    r_t = Σ_k w_k Σ_j 1(t = T_j) R_k(x, y, j) − β k(log π_old, log π_ref)_t,

with ``T_j`` the last token of segment ``j``. Here every model uses sentences as its
segments, and a segment reward model is a :class:`rlhf_jax.models.ScalarModel` whose
per-token scalar at a sentence's last token is that sentence's score (it has read the
prompt and the response up to there, as the paper's models do).

- Segmentation in the graph (:func:`sentence_segment_ids`): a response token closes a
  sentence when it is a sentence-ending token (``.``, ``!``, ``?``) followed by
  whitespace with more text to come; the last sentence ends at the response's last
  token (its EOS when one was sampled). This is the rule of
  :func:`rlhf_jax.objectives.fine_grained.sentence_spans` on byte tokens, without its
  closing-quote clause.
- Training a segment model (:func:`make_segment_reward_step`): squared error
  ``½ Σ_j (v_{T_j} − y_j)²`` over the sentence ends of labelled demonstrations, averaged
  over sentences.
- PPO (:func:`make_fine_grained_step`): the PPO iteration of
  :mod:`rlhf_jax.train.steps.ppo` with the dense rewards above
  (:func:`dense_rewards`, via ``objectives.fine_grained.combine_segment_rewards``) in
  place of the single sequence score; GAE runs on the dense rewards. The step reports
  ``reward_score`` as the mean over responses of ``Σ_t Σ_k w_k`` (placed rewards), and
  ``<name>_score`` per model.

``state.params`` are the PPO step's (separate critic: ``{"policy", "value"}``; shared:
the :class:`rlhf_jax.models.PolicyWithValueHead` state) and ``state.extra`` holds the
frozen ``reference_params``, the ``segment_reward_params`` (a dict by model name) and
``kl_coef``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import Array

from rlhf_jax.models.logprobs import response_logprobs
from rlhf_jax.objectives.advantages import gae_advantages
from rlhf_jax.objectives.fine_grained import combine_segment_rewards, segment_ends
from rlhf_jax.objectives.kl import kl_penalised_rewards
from rlhf_jax.objectives.reduction import reduce_loss
from rlhf_jax.train.state import Metrics, PyTree, TrainState, make_gradient_step
from rlhf_jax.train.steps.common import StepFn
from rlhf_jax.train.steps.ppo import (
    PROMPT_KEYS,
    PPOConfig,
    PPOModels,
    Rollout,
    actor_critic_forward,
    finish_iteration,
    rollout_data,
)
from rlhf_jax.train.steps.rollout import (
    actor_critic_sum_loss,
    frozen_token_logprobs,
    generate,
    ppo_epochs,
    state_values,
    whiten,
)


def sentence_segment_ids(
    tokens: Array,
    mask: Array,
    *,
    end_ids: Sequence[int],
    separator_ids: Sequence[int],
    eos_id: int | None = None,
) -> Array:
    """Sentence index of every response token, 0 elsewhere.

    Response token ``t`` closes a sentence when it is one of ``end_ids``, the next
    response token is one of ``separator_ids``, and some later response token is neither
    a separator nor ``eos_id`` (so trailing whitespace and the EOS join the last
    sentence, as text after the last span does in
    :func:`rlhf_jax.objectives.fine_grained.token_segment_ids`). Tokens after a close
    (the separator included) belong to the next sentence.

    Args:
      tokens: int ``[B, L]``.
      mask: ``[B, L]`` response mask.
      end_ids: sentence-ending token ids (e.g. the bytes ``.!?``).
      separator_ids: whitespace token ids that must follow a sentence end.
      eos_id: the end-of-sequence id, not content (``None``: none).

    Returns:
      int32 ``[B, L]``: 0, 1, … in order over each response.
    """
    chex.assert_rank([tokens, mask], 2)
    chex.assert_equal_shape([tokens, mask])
    valid = mask > 0
    is_separator = jnp.isin(tokens, jnp.asarray(separator_ids, tokens.dtype))
    next_is_separator = jnp.pad(is_separator[:, 1:] & valid[:, 1:], ((0, 0), (0, 1)))
    content = valid & ~is_separator
    if eos_id is not None:
        content = content & (tokens != eos_id)
    content_here_or_later = jnp.cumsum(content[:, ::-1], axis=1)[:, ::-1]
    content_later = jnp.pad(content_here_or_later[:, 1:], ((0, 0), (0, 1))) > 0
    closes = (
        valid
        & jnp.isin(tokens, jnp.asarray(end_ids, tokens.dtype))
        & next_is_separator
        & content_later
    )
    before = jnp.cumsum(closes, axis=1) - closes
    return jnp.where(valid, before, 0).astype(jnp.int32)


def segment_scores(scalars: Array, segment_ids: Array, mask: Array) -> Array:
    """``[B, L]`` slot ``j`` of each row: the scalar at the last token of segment ``j``.

    Args:
      scalars: ``[B, L]`` a segment model's per-token scalars.
      segment_ids: int ``[B, L]``.
      mask: ``[B, L]`` response mask.

    Returns:
      ``[B, L]`` segment scores in slots ``0 … S−1`` (0 in unused slots).
    """
    chex.assert_equal_shape([scalars, segment_ids, mask])
    at_ends = jnp.where(segment_ends(mask, segment_ids), scalars, 0.0)
    slots = scalars.shape[1]
    per_row = jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_segments=slots))
    return per_row(at_ends, segment_ids)


def dense_rewards(
    model_scalars: Sequence[Array], segment_ids: Array, mask: Array, weights: Sequence[float]
) -> Array:
    """``r_t = Σ_k w_k Σ_j 1(t = T_j) R_k(j)`` with ``R_k(j)`` read at the segment ends.

    Wu et al. (2023), eq. 1 without the KL term, every model on the same sentences.

    Args:
      model_scalars: per model ``k``, its ``[B, L]`` per-token scalars.
      segment_ids: int ``[B, L]`` sentence ids (:func:`sentence_segment_ids`).
      mask: ``[B, L]`` response mask.
      weights: ``w_k``, one per model.

    Returns:
      ``[B, L]`` rewards, non-zero only at sentence ends.
    """
    scores = [segment_scores(s, segment_ids, mask) for s in model_scalars]
    return combine_segment_rewards(scores, [segment_ids] * len(scores), mask, weights)


def segment_regression_loss(
    scalars: Array, ends: Array, labels: Array, *, reduction: str = "mean"
) -> tuple[Array, dict[str, Array]]:
    """``½ Σ ends · (v − y)²`` over the sentence-end tokens, averaged over sentences.

    Args:
      scalars: ``[B, L]`` the segment model's per-token scalars.
      ends: ``[B, L]`` 1 at the last token of each labelled sentence.
      labels: ``[B, L]`` the sentence's label at its last token.
      reduction: ``"mean"`` or ``"sum"``.

    Returns:
      ``(loss, metrics)`` with ``denominator`` (sentences) and ``mean_abs_error``.
    """
    chex.assert_equal_shape([scalars, ends, labels])
    errors = scalars - labels
    loss, denominator = reduce_loss(0.5 * jnp.square(errors), ends, reduction=reduction)
    weights = ends.astype(errors.dtype)
    mean_abs = jnp.sum(weights * jnp.abs(errors)) / jnp.maximum(jnp.sum(weights), 1.0)
    return loss, {"denominator": denominator, "mean_abs_error": mean_abs}


def make_segment_reward_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, num_micro_batches: int = 1
) -> StepFn:
    """A gradient step of a segment reward model (:func:`segment_regression_loss`).

    The batch holds ``input_ids``, ``attention_mask``, ``segment_ends`` and
    ``segment_labels``, each ``[B, L]``.
    """

    def loss_fn(params: PyTree, batch: Mapping[str, Array], rng: Array):
        del rng
        scalars = nnx.merge(graphdef, params)(
            batch["input_ids"], attention_mask=batch["attention_mask"]
        )
        return segment_regression_loss(
            scalars, batch["segment_ends"], batch["segment_labels"], reduction="sum"
        )

    return make_gradient_step(loss_fn, tx, num_micro_batches=num_micro_batches)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FineGrainedConfig:
    """Static settings of the fine-grained PPO step.

    Attributes:
      ppo: the PPO settings (sampler, update, KL controller).
      reward_weights: ``(name, w_k)`` per segment model, in a fixed order.
      end_ids: sentence-ending token ids.
      separator_ids: whitespace token ids that follow a sentence end.
    """

    ppo: PPOConfig
    reward_weights: tuple[tuple[str, float], ...]
    end_ids: tuple[int, ...]
    separator_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class FineGrainedModels:
    """Graph definitions: policy (and reference), critic, and the segment models' trunk+head.

    Attributes:
      policy: :class:`rlhf_jax.models.Decoder` graphdef.
      critic: the critic's graphdef (as :class:`rlhf_jax.train.steps.ppo.PPOModels`).
      segment_model: the :class:`rlhf_jax.models.ScalarModel` graphdef of every segment
        reward model.
      shared_critic: whether the value head shares the policy's trunk.
    """

    policy: nnx.GraphDef
    critic: nnx.GraphDef
    segment_model: nnx.GraphDef
    shared_critic: bool

    def ppo_models(self) -> PPOModels:
        """The PPO graph definitions (the reward slot holds the segment models')."""
        return PPOModels(self.policy, self.critic, self.segment_model, self.shared_critic)


def init_fine_grained_extra(
    *, reference_params: PyTree, segment_reward_params: Mapping[str, PyTree], kl_coef: float
) -> dict[str, Any]:
    """``state.extra``: the frozen reference, the segment models by name, and β."""
    return {
        "reference_params": reference_params,
        "segment_reward_params": dict(segment_reward_params),
        "kl_coef": jnp.asarray(kl_coef, jnp.float32),
    }


def make_fine_grained_step(
    models: FineGrainedModels, tx: optax.GradientTransformation, config: FineGrainedConfig
) -> StepFn:
    """The pure fine-grained PPO iteration ``step(state, prompts, rng) -> (state, metrics)``.

    Args:
      models: the graph definitions (static).
      tx: the optax transformation of ``state.opt_state``.
      config: static settings.

    Returns:
      The step. Metrics: the PPO step's, with ``reward_score`` the mean summed dense
      reward of a response, plus ``<name>_score`` (the mean of ``Σ_j R_k(j)``, unweighted)
      per segment model and ``sentences`` (mean sentences per response).
    """
    ppo_models = models.ppo_models()
    forward = actor_critic_forward(ppo_models)
    update = config.ppo.update
    names = tuple(name for name, _ in config.reward_weights)
    weights = tuple(weight for _, weight in config.reward_weights)

    def step(
        state: TrainState, prompts: Mapping[str, Array], rng: Array
    ) -> tuple[TrainState, Metrics]:
        sample_key, update_key = jax.random.split(rng)
        output = generate(
            models.policy,
            state.params["policy"],
            {k: prompts[k] for k in PROMPT_KEYS},
            sample_key,
            sampling=config.ppo.sampling,
        )
        tokens, attention_mask, mask = output.tokens, output.attention_mask, output.response_mask
        extra = state.extra
        logits, scalars = forward(jax.lax.stop_gradient(state.params), tokens, attention_mask)
        old_logprobs, _ = response_logprobs(logits, tokens, mask)
        ref_logprobs = frozen_token_logprobs(
            models.policy, extra["reference_params"], tokens, attention_mask, mask
        )
        segment_ids = sentence_segment_ids(
            tokens,
            mask,
            end_ids=config.end_ids,
            separator_ids=config.separator_ids,
            eos_id=config.ppo.sampling.eos_id,
        )
        model_scalars = [
            jax.lax.stop_gradient(
                nnx.merge(models.segment_model, extra["segment_reward_params"][name])(
                    tokens, attention_mask=attention_mask
                )
            )
            for name in names
        ]
        placed = dense_rewards(model_scalars, segment_ids, mask, weights)
        kl_coef = extra["kl_coef"]
        penalty = kl_penalised_rewards(
            jnp.zeros(tokens.shape[0]),
            old_logprobs,
            ref_logprobs,
            mask,
            kl_coef=kl_coef if update.kl_mode == "reward" else 0.0,
            estimator=update.kl_estimator,
        )
        rewards = placed + penalty
        rollout = Rollout(
            output=output,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            old_values=state_values(scalars["reward"], mask),
            scores=jnp.sum(placed, axis=1),
        )
        advantages, returns = gae_advantages(
            rewards, rollout.old_values, mask, gamma=update.gamma, lam=update.lam
        )
        if update.whiten_advantages:
            advantages = whiten(advantages, mask)
        loss_fn = actor_critic_sum_loss(forward, ("reward",), update, kl_coef)
        data = rollout_data(rollout, advantages, returns)
        state, metrics = ppo_epochs(loss_fn, tx, state, data, update_key, config=update)
        state, metrics = finish_iteration(state, metrics, rollout, rewards, config.ppo)
        ends = segment_ends(mask, segment_ids)
        for name, values in zip(names, model_scalars, strict=True):
            metrics[f"{name}_score"] = jnp.mean(jnp.sum(jnp.where(ends, values, 0.0), axis=1))
        metrics["sentences"] = jnp.mean(jnp.sum(ends, axis=1).astype(jnp.float32))
        return state, metrics

    return step
