"""The CGPO step: constrained policy optimisation with a mixture of judges (CRPG, CRRAFT, CODPO).

Xu et al. (2024), "The Perfect Blend: Redefining RLHF with Mixture of Judges", §4. One
call of the step:

1. samples ``n`` responses ``a ~ π_θ(·|s)`` per prompt and one baseline response ``ā``
   from the frozen reference (the initial policy);
2. scores every response with the frozen reward model and calibrates the reward against
   the baseline, ``R_calib(s, a) = σ(r(s, a) − r(s, ā))`` (§4.1);
3. runs the mixture of judges on every sample (:func:`judge_violations`), flagging it when
   any judge does: rule-based judges on the tokens, a length limit and banned token
   sequences (e.g. the harm markers of the embedded task), and a model-based judge, the
   cost model's score above a threshold;
4. updates the policy on the fixed samples with the constrained optimiser:
   CRPG, ``g = (1/|B|) Σ ψ R_calib ∇ log π(a|s)`` (``objectives.cgpo.crpg_loss``),
   CRRAFT, SFT on each prompt's best unflagged sample (``objectives.cgpo.crraft_loss``),
   or CODPO, DPO plus a length-normalised NLL on the pair (best unflagged sample, lowest
   ranked other sample, flagged samples ranked last; ``objectives.cgpo.codpo_pairs`` and
   ``codpo_loss``). A flagged sample gets ``ψ = 0`` in CRPG, is never fitted by CRRAFT
   and is never the chosen response of CODPO, so it never receives a positive update
   from the reward. ``kl_coef > 0`` adds ``β·k3`` KL to the reference on every
   sample (the regularisation of "calibrated-regularised"; it pulls every sample,
   flagged or not, towards the reference).

The update is ``epochs × num_minibatches`` gradient steps over the prompts (each with its
``n`` samples) by :func:`rlhf_jax.train.steps.rollout.ppo_epochs`; one epoch and one
minibatch is the paper's on-policy update. ``state.params = {"policy": ...}``;
``state.extra`` holds the frozen ``reference_params``, ``reward_params`` and (with a
cost judge) ``cost_params``. With every judge passing, CRPG is the calibrated-reward
policy gradient, CRRAFT is RAFT and CODPO is online DPO (best against worst sample) plus
the NLL term.

The rollout (:func:`make_cgpo_rollout`) and the update (:func:`make_cgpo_update`) are
separate pure functions, composed by :func:`make_cgpo_step`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import Array

from rlhf_jax.models.logprobs import response_logprobs
from rlhf_jax.objectives.cgpo import (
    calibrated_reward,
    codpo_loss,
    codpo_pairs,
    crpg_loss,
    crraft_loss,
    length_violation,
    score_violation,
    select_samples,
)
from rlhf_jax.objectives.kl import kl_k3
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train.state import Metrics, PyTree, TrainState
from rlhf_jax.train.steps.common import StepFn
from rlhf_jax.train.steps.ppo import PROMPT_KEYS
from rlhf_jax.train.steps.rollout import (
    PPOUpdateConfig,
    frozen_token_logprobs,
    generate,
    ppo_epochs,
    rollout_metrics,
    sequence_scores,
)

UPDATES = ("crpg", "crraft", "codpo")
SAMPLE_KEYS = ("tokens", "attention_mask", "response_mask", "ref_logprobs")


@dataclasses.dataclass(frozen=True, kw_only=True)
class JudgeConfig:
    """The mixture of judges; a sample is flagged when any enabled judge flags it.

    Attributes:
      max_tokens: rule-based length judge, more than ``max_tokens`` response tokens
        (``None``: off).
      banned_sequences: rule-based judge, a response containing any of these token-id
        sequences (empty: off).
      cost_threshold: model-based judge, the cost model's score above this threshold
        (``None``: off; needs the cost model).
    """

    max_tokens: int | None = None
    banned_sequences: tuple[tuple[int, ...], ...] = ()
    cost_threshold: float | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class CGPOConfig:
    """Static settings of the CGPO step.

    Attributes:
      sampling: the rollout sampler's settings (policy and baseline).
      judges: the mixture of judges.
      update: ``"crpg"``, ``"crraft"`` or ``"codpo"``.
      num_samples: n, responses per prompt (≥ 2 for CODPO's pairs).
      codpo_beta: β of CODPO's DPO term.
      codpo_nll_coef: λ, the weight of CODPO's NLL of the chosen response.
      kl_coef: β of the ``k3`` KL-to-reference term (0: none).
      epochs: passes over each rollout.
      num_minibatches: minibatches (of prompts) per epoch.
      num_micro_batches: gradient-accumulation micro-batches per minibatch.
    """

    sampling: SamplingConfig
    judges: JudgeConfig = dataclasses.field(default_factory=JudgeConfig)
    update: str = "crpg"
    num_samples: int = 4
    codpo_beta: float = 0.1
    codpo_nll_coef: float = 1.0
    kl_coef: float = 0.0
    epochs: int = 1
    num_minibatches: int = 1
    num_micro_batches: int = 1

    def __post_init__(self) -> None:
        if self.update not in UPDATES:
            raise ValueError(f"CGPOConfig.update must be one of {UPDATES}, got {self.update!r}")
        if self.num_samples < (2 if self.update == "codpo" else 1):
            raise ValueError(
                f"CGPOConfig.num_samples must be >= 1 (2 for CODPO), got {self.num_samples}"
            )

    @property
    def schedule(self) -> PPOUpdateConfig:
        """The epoch and minibatch schedule of :func:`ppo_epochs`."""
        return PPOUpdateConfig(
            epochs=self.epochs,
            num_minibatches=self.num_minibatches,
            num_micro_batches=self.num_micro_batches,
        )


@dataclasses.dataclass(frozen=True)
class CGPOModels:
    """Graph definitions: the policy (and reference) decoder and the frozen scorers.

    Attributes:
      policy: :class:`rlhf_jax.models.Decoder` graphdef of the policy and the reference.
      reward: the reward model's :class:`rlhf_jax.models.ScalarModel` graphdef.
      cost: the cost model's graphdef, or ``None`` without a model-based judge.
    """

    policy: nnx.GraphDef
    reward: nnx.GraphDef
    cost: nnx.GraphDef | None = None


def init_cgpo_extra(
    *, reference_params: PyTree, reward_params: PyTree, cost_params: PyTree | None = None
) -> dict[str, Any]:
    """``state.extra`` of a CGPO run: the frozen reference, reward and (optional) cost models."""
    extra = {"reference_params": reference_params, "reward_params": reward_params}
    if cost_params is not None:
        extra["cost_params"] = cost_params
    return extra


def banned_sequence_violation(
    tokens: Array, mask: Array, *, sequences: Sequence[Sequence[int]]
) -> Array:
    """Rule-based judge: some banned token sequence occurs within the response. ``[B] bool``.

    A sequence ``(s_0, …, s_{k−1})`` occurs at ``t`` when ``tokens[t + j] = s_j`` and
    ``mask[t + j] = 1`` for every ``j`` (all on response tokens). For one-token sequences
    this is ``objectives.cgpo.banned_token_violation``.

    Args:
      tokens: int ``[B, L]`` token ids.
      mask: ``[B, L]`` response mask.
      sequences: the banned sequences (non-empty each); none flags nothing.

    Returns:
      bool ``[B]``.
    """
    chex.assert_rank([tokens, mask], 2)
    chex.assert_equal_shape([tokens, mask])
    if not sequences:
        return jnp.zeros(tokens.shape[0], bool)
    width = max(len(s) for s in sequences)
    if min(len(s) for s in sequences) < 1:
        raise ValueError("banned sequences must not be empty")
    # [M, K] banned ids, −1 past each sequence's end (matches anything).
    banned = jnp.asarray([list(s) + [-1] * (width - len(s)) for s in sequences], tokens.dtype)
    valid = mask > 0
    padded = jnp.pad(tokens, ((0, 0), (0, width)), constant_values=-2)
    padded_valid = jnp.pad(valid, ((0, 0), (0, width)))
    length = tokens.shape[1]
    windows = jnp.stack([padded[:, j : j + length] for j in range(width)], axis=-1)
    windows_valid = jnp.stack([padded_valid[:, j : j + length] for j in range(width)], axis=-1)
    hit = (windows[:, :, None, :] == banned) & windows_valid[:, :, None, :]
    match = jnp.all(hit | (banned < 0), axis=-1)  # [B, L, M]
    return jnp.any(match, axis=(1, 2))


def judge_violations(
    judges: JudgeConfig, tokens: Array, response_mask: Array, cost_scores: Array | None
) -> dict[str, Array]:
    """Each enabled judge's ``[B]`` bool flags and their mixture (``"any"``).

    Args:
      judges: which judges run.
      tokens: int ``[B, L]``.
      response_mask: ``[B, L]``.
      cost_scores: ``[B]`` cost-model scores, or ``None`` without a model-based judge.

    Returns:
      ``{"length"?, "banned"?, "cost"?, "any"}`` (only the enabled judges).
    """
    flags = {}
    if judges.max_tokens is not None:
        flags["length"] = length_violation(response_mask, max_tokens=judges.max_tokens)
    if judges.banned_sequences:
        flags["banned"] = banned_sequence_violation(
            tokens, response_mask, sequences=judges.banned_sequences
        )
    if judges.cost_threshold is not None:
        if cost_scores is None:
            raise ValueError("JudgeConfig.cost_threshold needs a cost model (CGPOModels.cost)")
        flags["cost"] = score_violation(cost_scores, threshold=judges.cost_threshold)
    mixture = jnp.zeros(tokens.shape[0], bool)
    for flag in flags.values():
        mixture = mixture | flag
    return {**flags, "any": mixture}


def make_cgpo_rollout(
    models: CGPOModels, config: CGPOConfig
) -> Callable[[TrainState, Mapping[str, Array], Array], tuple[dict[str, Array], Metrics]]:
    """``rollout(state, prompts, rng) -> (data, metrics)``: steps 1–3 of the iteration.

    ``prompts`` holds left-padded ``input_ids`` and ``attention_mask`` ``[P, S]``. The
    data are ``[P, n, L]`` ``tokens``, ``attention_mask``, ``response_mask``,
    ``ref_logprobs`` and ``[P, n]`` ``rewards``, ``calibrated_rewards`` and
    ``violations``. Metrics: ``reward_score`` (mean over the samples),
    ``baseline_reward``, ``calibrated_reward``, ``violation_rate`` and
    ``<judge>_violation_rate`` per judge, ``cost_score`` (with a cost model),
    ``response_length`` and ``eos_fraction``.
    """
    n = config.num_samples

    def rollout(
        state: TrainState, prompts: Mapping[str, Array], rng: Array
    ) -> tuple[dict[str, Array], Metrics]:
        sample_key, baseline_key = jax.random.split(rng)
        prompts = {k: prompts[k] for k in PROMPT_KEYS}
        num_prompts = prompts["input_ids"].shape[0]
        repeated = {k: jnp.repeat(v, n, axis=0) for k, v in prompts.items()}
        output = generate(
            models.policy, state.params["policy"], repeated, sample_key, sampling=config.sampling
        )
        baseline = generate(
            models.policy,
            state.extra["reference_params"],
            prompts,
            baseline_key,
            sampling=config.sampling,
        )
        extra = state.extra
        tokens, attention_mask, mask = output.tokens, output.attention_mask, output.response_mask
        rewards = sequence_scores(models.reward, extra["reward_params"], tokens, attention_mask)
        baseline_rewards = sequence_scores(
            models.reward, extra["reward_params"], baseline.tokens, baseline.attention_mask
        )
        cost_scores = None
        if models.cost is not None:
            cost_scores = sequence_scores(models.cost, extra["cost_params"], tokens, attention_mask)
        flags = judge_violations(config.judges, tokens, mask, cost_scores)
        rewards = rewards.reshape(num_prompts, n)
        samples = {
            "tokens": tokens,
            "attention_mask": attention_mask,
            "response_mask": mask,
            "ref_logprobs": frozen_token_logprobs(
                models.policy, extra["reference_params"], tokens, attention_mask, mask
            ),
        }
        data = {k: v.reshape(num_prompts, n, *v.shape[1:]) for k, v in samples.items()}
        data["rewards"] = rewards
        data["calibrated_rewards"] = calibrated_reward(rewards, baseline_rewards[:, None])
        data["violations"] = flags["any"].reshape(num_prompts, n)
        metrics = {
            **rollout_metrics(output, config.sampling.eos_id),
            "reward_score": jnp.mean(rewards),
            "baseline_reward": jnp.mean(baseline_rewards),
            "calibrated_reward": jnp.mean(data["calibrated_rewards"]),
            "violation_rate": jnp.mean(flags["any"].astype(jnp.float32)),
        }
        for name, flag in flags.items():
            if name != "any":
                metrics[f"{name}_violation_rate"] = jnp.mean(flag.astype(jnp.float32))
        if cost_scores is not None:
            metrics["cost_score"] = jnp.mean(cost_scores)
        return data, metrics

    return rollout


def cgpo_sum_loss(
    models: CGPOModels, config: CGPOConfig
) -> Callable[[PyTree, Mapping[str, Array], Array], tuple[Array, Metrics]]:
    """``loss_fn(params, micro_batch, rng) -> (Σ loss, metrics)`` of CRPG, CRRAFT or CODPO.

    The micro-batch holds ``[p, n, ...]`` arrays of :func:`make_cgpo_rollout`. CRPG:
    ``Σ_samples −ψ R_calib log π(a|s)`` over ``p·n`` samples (denominator: samples);
    CRRAFT: the token NLL of each prompt's best unflagged sample (denominator: its
    tokens); CODPO: the loss of each prompt's pair (denominator: prompts with an
    unflagged sample), the reference log-probs being the rollout's. ``kl_coef > 0``
    adds ``β Σ k3`` over the response tokens of every sample, sharing the denominator.
    """

    def loss_fn(params: PyTree, batch: Mapping[str, Array], rng: Array) -> tuple[Array, Metrics]:
        del rng
        p, n, length = batch["tokens"].shape
        flat = {k: batch[k].reshape(p * n, length) for k in SAMPLE_KEYS}
        policy = nnx.merge(models.policy, params["policy"])
        logits, _ = policy(flat["tokens"], attention_mask=flat["attention_mask"])
        token_logps, sequence_logps = response_logprobs(
            logits, flat["tokens"], flat["response_mask"]
        )
        if config.update == "crpg":
            loss, metrics = crpg_loss(
                sequence_logps,
                batch["calibrated_rewards"].reshape(p * n),
                batch["violations"].reshape(p * n),
                reduction="sum",
            )
        elif config.update == "crraft":
            loss, metrics = crraft_loss(
                token_logps.reshape(p, n, length),
                batch["response_mask"].astype(jnp.float32),
                batch["rewards"],
                batch["violations"],
                reduction="sum",
            )
        else:
            per_sample = {
                "policy": sequence_logps,
                "reference": jnp.sum(flat["ref_logprobs"] * flat["response_mask"], axis=1),
                "length": jnp.sum(flat["response_mask"], axis=1),
            }
            per_sample = {k: v.reshape(p, n) for k, v in per_sample.items()}
            chosen, rejected, valid = codpo_pairs(batch["rewards"], batch["violations"])
            loss, metrics = codpo_loss(
                select_samples(per_sample["policy"], chosen),
                select_samples(per_sample["policy"], rejected),
                select_samples(per_sample["reference"], chosen),
                select_samples(per_sample["reference"], rejected),
                select_samples(per_sample["length"], chosen),
                valid=valid,
                beta=config.codpo_beta,
                nll_coef=config.codpo_nll_coef,
                reduction="sum",
            )
        metrics = dict(metrics)
        if config.kl_coef > 0.0:
            per_token = kl_k3(token_logps, flat["ref_logprobs"]) * flat["response_mask"]
            kl_term = jnp.sum(per_token)
            loss = loss + config.kl_coef * kl_term
            metrics["kl_loss"] = kl_term / jnp.maximum(metrics["denominator"], 1.0)
        return loss, metrics

    return loss_fn


def make_cgpo_update(
    models: CGPOModels, tx: optax.GradientTransformation, config: CGPOConfig
) -> Callable[[TrainState, Mapping[str, Array], Array], tuple[TrainState, Metrics]]:
    """``update(state, data, rng) -> (state, metrics)``: step 4 on a rollout's data."""
    loss_fn = cgpo_sum_loss(models, config)

    def update(
        state: TrainState, data: Mapping[str, Array], rng: Array
    ) -> tuple[TrainState, Metrics]:
        return ppo_epochs(loss_fn, tx, state, data, rng, config=config.schedule)

    return update


def make_cgpo_step(
    models: CGPOModels, tx: optax.GradientTransformation, config: CGPOConfig
) -> StepFn:
    """The pure CGPO iteration ``step(state, prompts, rng) -> (state, metrics)``.

    Args:
      models: the graph definitions (static).
      tx: the optax transformation of ``state.opt_state`` (the policy's).
      config: static settings.

    Returns:
      The step: :func:`make_cgpo_rollout` then :func:`make_cgpo_update`; metrics of both
      (the update's averaged over its gradient steps).
    """
    rollout = make_cgpo_rollout(models, config)
    update = make_cgpo_update(models, tx, config)

    def step(
        state: TrainState, prompts: Mapping[str, Array], rng: Array
    ) -> tuple[TrainState, Metrics]:
        rollout_key, update_key = jax.random.split(rng)
        data, rollout_metrics_ = rollout(state, prompts, rollout_key)
        state, update_metrics = update(state, data, update_key)
        # The rollout's violation rate is the judges' verdict; the loss reports its own.
        update_metrics = {k: v for k, v in update_metrics.items() if k != "violation_rate"}
        return state, {**update_metrics, **rollout_metrics_}

    return step
