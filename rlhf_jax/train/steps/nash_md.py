"""Nash-MD, IPO-MD and online IPO steps: self-play against a preference model.

Nash-MD (Munos et al., 2023, "Nash Learning from Human Feedback", §7, "Nash-MD-PG")
approaches the Nash equilibrium of the τ-regularised preference game by playing the
policy against its geometric mixture with the reference,
``π^μ_β(y|x) ∝ π_θ(y|x)^{1−β} μ(y|x)^β``. Per batch of prompts it

1. samples ``y ~ π_θ`` and ``y' ~ π^μ_β`` (the mixture is sampled token by token from
   ``log_softmax((1 − β) log π_θ + β log μ)`` with :func:`rlhf_jax.sampling.sample_combined`,
   the per-token approximation of the sequence-level mixture the paper uses);
2. asks a preference model for ``P(y ≻ y' | x)``;
3. takes one gradient step on ``−sg[P(y ≻ y') − ½ − τ log(π_θ(y)/μ(y))] · log π_θ(y)``
   (:func:`rlhf_jax.objectives.nash.nash_md_pg_loss`).

IPO-MD and online IPO (Calandriello et al., 2024) regress the log-ratio difference of a
pair on its soft preference, ``(h − (P(y₁ ≻ y₂) − ½)/τ)²`` (``pairwise.ipo_loss`` with soft
labels): with both responses drawn from the mixture (``loss="ipo_md"``) or from the policy
(``loss="online_ipo"``).

Two preference models are supported:

- a trained reward model ``r`` turned into ``P(y ≻ y') = σ(r(x, y) − r(x, y'))``
  (:func:`reward_model_preferences`), inside the jitted step (:func:`make_nash_md_step`);
- any host function of decoded text, e.g. the embedded task's non-transitive oracle. It
  runs in Python between two jitted functions: :func:`make_nash_md_generate` samples the
  pairs, :func:`oracle_preferences` decodes and labels them on the host, and
  :func:`make_nash_md_update` takes the gradient step. Nothing of the oracle is traced.

``state.params`` are the policy decoder's parameters; ``state.extra`` holds the frozen
``reference_params`` (and ``reward_params`` with a reward-model preference).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax import Array

from rlhf_jax.models.logprobs import sequence_logprobs
from rlhf_jax.objectives.nash import ipo_md_loss, nash_md_pg_loss, online_ipo_loss
from rlhf_jax.sampling import SampleOutput, SamplingConfig, sample_combined
from rlhf_jax.train.state import Metrics, PyTree, SumLossFn, TrainState, make_gradient_step
from rlhf_jax.train.steps.common import StepFn
from rlhf_jax.train.steps.ppo import PROMPT_KEYS
from rlhf_jax.train.steps.rollout import generate, rollout_metrics, sequence_scores

NashLoss = Literal["nash_md", "ipo_md", "online_ipo"]
NASH_LOSSES = ("nash_md", "ipo_md", "online_ipo")
PAIR_ARRAYS = ("tokens", "attention_mask", "response_mask")
Oracle = Callable[[str, str, str], float]


@dataclasses.dataclass(frozen=True, kw_only=True)
class NashMDConfig:
    """Static settings of the Nash-MD family of steps.

    Attributes:
      sampling: the sampler's settings (both responses).
      loss: ``"nash_md"`` (y ~ π, y' ~ mixture), ``"ipo_md"`` (both from the mixture) or
        ``"online_ipo"`` (both from π).
      mixture_beta: β of the mixture ``π^{1−β} μ^β`` (Munos et al. take β = ητ).
      tau: regularisation τ of the game (the KL weight).
      num_micro_batches: gradient-accumulation micro-batches.
    """

    sampling: SamplingConfig
    loss: NashLoss = "nash_md"
    mixture_beta: float = 0.125
    tau: float = 0.1
    num_micro_batches: int = 1

    def __post_init__(self) -> None:
        if self.loss not in NASH_LOSSES:
            raise ValueError(f"NashMDConfig.loss must be one of {NASH_LOSSES}, got {self.loss!r}")
        if not 0.0 <= self.mixture_beta <= 1.0:
            raise ValueError(
                f"NashMDConfig.mixture_beta must be in [0, 1], got {self.mixture_beta}"
            )
        if self.tau <= 0.0:
            raise ValueError(f"NashMDConfig.tau must be > 0, got {self.tau}")

    @property
    def mixture_sides(self) -> tuple[bool, bool]:
        """Whether the first and the second response come from the mixture."""
        return {
            "nash_md": (False, True),
            "ipo_md": (True, True),
            "online_ipo": (False, False),
        }[self.loss]


@dataclasses.dataclass(frozen=True)
class NashMDModels:
    """Graph definitions of the policy/reference decoder and the optional reward model.

    Attributes:
      policy: :class:`rlhf_jax.models.Decoder` graphdef of the policy and the reference.
      reward: :class:`rlhf_jax.models.ScalarModel` graphdef of the reward model behind a
        reward-model preference, or ``None`` with a host oracle.
    """

    policy: nnx.GraphDef
    reward: nnx.GraphDef | None = None


@struct.dataclass
class ResponsePairs:
    """Two sampled responses per prompt, ``[B, P + N]`` arrays each (see ``SampleOutput``).

    Attributes:
      first: ``y`` (Nash-MD: from the policy) or ``y₁``.
      second: ``y'`` (Nash-MD: from the mixture) or ``y₂``.
    """

    first: SampleOutput
    second: SampleOutput


def mixture_sample(
    policy_graphdef: nnx.GraphDef,
    policy_params: PyTree,
    reference_params: PyTree,
    prompts: Mapping[str, Array],
    rng: Array,
    *,
    beta: float,
    sampling: SamplingConfig,
) -> SampleOutput:
    """Sample from ``log_softmax((1 − β) log π + β log μ)`` token by token (no gradient).

    With ``β = 0`` this is sampling from the policy alone.
    """
    output = sample_combined(
        (policy_graphdef, policy_graphdef),
        jax.lax.stop_gradient((policy_params, reference_params)),
        jnp.asarray([1.0 - beta, beta], jnp.float32),
        prompts["input_ids"],
        prompts["attention_mask"],
        rng,
        config=sampling,
    )
    return jax.lax.stop_gradient(output)


def sample_pairs(
    models: NashMDModels,
    policy_params: PyTree,
    reference_params: PyTree,
    prompts: Mapping[str, Array],
    rng: Array,
    config: NashMDConfig,
) -> ResponsePairs:
    """The two responses the configured loss compares, drawn with independent keys."""
    prompts = {k: prompts[k] for k in PROMPT_KEYS}
    outputs = []
    for index, from_mixture in enumerate(config.mixture_sides):
        key = jax.random.fold_in(rng, index)
        if from_mixture:
            outputs.append(
                mixture_sample(
                    models.policy,
                    policy_params,
                    reference_params,
                    prompts,
                    key,
                    beta=config.mixture_beta,
                    sampling=config.sampling,
                )
            )
        else:
            outputs.append(
                generate(models.policy, policy_params, prompts, key, sampling=config.sampling)
            )
    return ResponsePairs(first=outputs[0], second=outputs[1])


def reward_model_preferences(
    reward_graphdef: nnx.GraphDef, reward_params: PyTree, pairs: ResponsePairs
) -> Array:
    """``P(y₁ ≻ y₂ | x) = σ(r(x, y₁) − r(x, y₂))`` (Bradley–Terry on a reward model), ``[B]``."""
    first = sequence_scores(
        reward_graphdef, reward_params, pairs.first.tokens, pairs.first.attention_mask
    )
    second = sequence_scores(
        reward_graphdef, reward_params, pairs.second.tokens, pairs.second.attention_mask
    )
    return jax.nn.sigmoid(first - second)


def decode_responses(output: SampleOutput, decode: Callable[[Sequence[int]], str]) -> list[str]:
    """Host-side texts of the sampled responses (the tokens under ``response_mask``)."""
    tokens = np.asarray(output.tokens)
    mask = np.asarray(output.response_mask).astype(bool)
    return [decode(row[keep].tolist()) for row, keep in zip(tokens, mask, strict=True)]


def oracle_preferences(
    pairs: ResponsePairs,
    prompts: Sequence[str],
    decode: Callable[[Sequence[int]], str],
    oracle: Oracle,
) -> np.ndarray:
    """``P(y₁ ≻ y₂ | x)`` from a host oracle on decoded text, float32 ``[B]``.

    Runs in Python, outside any jitted function: it fetches the pairs from the device,
    decodes them and calls ``oracle(prompt, first_text, second_text)`` per prompt.
    """
    pairs = jax.device_get(pairs)
    first = decode_responses(pairs.first, decode)
    second = decode_responses(pairs.second, decode)
    if len(prompts) != len(first):
        raise ValueError(f"{len(prompts)} prompt texts for {len(first)} sampled pairs")
    return np.asarray(
        [oracle(x, a, b) for x, a, b in zip(prompts, first, second, strict=True)], np.float32
    )


def _pair_batch(pairs: ResponsePairs, preferences: Array) -> dict[str, Array]:
    batch = {f"first_{k}": getattr(pairs.first, k) for k in PAIR_ARRAYS}
    batch.update({f"second_{k}": getattr(pairs.second, k) for k in PAIR_ARRAYS})
    batch["preferences"] = preferences.astype(jnp.float32)
    return batch


def _sequence_logps(
    graphdef: nnx.GraphDef, params: PyTree, batch: Mapping[str, Array], side: str
) -> Array:
    _, logps = sequence_logprobs(
        nnx.merge(graphdef, params),
        batch[f"{side}_tokens"],
        batch[f"{side}_attention_mask"],
        batch[f"{side}_response_mask"],
    )
    return logps


def nash_sum_loss(models: NashMDModels, config: NashMDConfig) -> SumLossFn:
    """``loss_fn(params, micro_batch, rng) -> (Σ loss, metrics)`` of the configured loss.

    The micro-batch holds both sides' arrays, ``preferences`` and the reference
    log-probs ``ref_first_logps`` / ``ref_second_logps`` ``[b]``.
    """

    def loss_fn(params: PyTree, batch: Mapping[str, Array], rng: Array) -> tuple[Array, Metrics]:
        del rng
        first = _sequence_logps(models.policy, params, batch, "first")
        if config.loss == "nash_md":
            return nash_md_pg_loss(
                first,
                batch["ref_first_logps"],
                batch["preferences"],
                tau=config.tau,
                reduction="sum",
            )
        second = _sequence_logps(models.policy, params, batch, "second")
        loss = ipo_md_loss if config.loss == "ipo_md" else online_ipo_loss
        value, metrics = loss(
            first,
            second,
            batch["ref_first_logps"],
            batch["ref_second_logps"],
            batch["preferences"],
            tau=config.tau,
            reduction="sum",
        )
        return value, {"denominator": metrics["denominator"]}

    return loss_fn


def make_nash_md_generate(
    models: NashMDModels, config: NashMDConfig
) -> Callable[[TrainState, Mapping[str, Array], Array], ResponsePairs]:
    """``generate(state, prompts, rng) -> ResponsePairs`` (pure; jit it once)."""

    def generate_pairs(state: TrainState, prompts: Mapping[str, Array], rng: Array):
        return sample_pairs(
            models, state.params, state.extra["reference_params"], prompts, rng, config
        )

    return generate_pairs


def make_nash_md_update(
    models: NashMDModels, tx: optax.GradientTransformation, config: NashMDConfig
) -> Callable[[TrainState, ResponsePairs, Array, Array], tuple[TrainState, Metrics]]:
    """``update(state, pairs, preferences, rng) -> (state, metrics)``: one gradient step.

    Args:
      models: graph definitions (static).
      tx: the optax transformation of ``state.opt_state``.
      config: static settings.

    Returns:
      The pure update. ``preferences`` ``[B]`` are ``P(first ≻ second | x)``. Metrics:
      ``preference`` (mean; for Nash-MD the policy's win rate against the mixture),
      ``kl`` (mean ``log π(y₁)/μ(y₁)`` of the first responses before the step: a k1
      estimate of KL(π ‖ μ) when ``y₁ ~ π``, i.e. for Nash-MD and online IPO),
      ``response_length``, ``loss``, ``grad_norm``, ``nonfinite``.
    """
    gradient_step = make_gradient_step(
        nash_sum_loss(models, config), tx, num_micro_batches=config.num_micro_batches
    )

    def update(state: TrainState, pairs: ResponsePairs, preferences: Array, rng: Array):
        chex.assert_shape(preferences, (pairs.first.tokens.shape[0],))
        batch = _pair_batch(pairs, preferences)
        reference = jax.lax.stop_gradient(state.extra["reference_params"])
        for side in ("first", "second"):
            batch[f"ref_{side}_logps"] = _sequence_logps(models.policy, reference, batch, side)
        policy_first = _sequence_logps(
            models.policy, jax.lax.stop_gradient(state.params), batch, "first"
        )
        state, metrics = gradient_step(state, batch, rng)
        metrics = {
            key: value
            for key, value in metrics.items()
            if key not in ("mean_preference", "mean_log_ratio")
        }
        return state, {
            **metrics,
            **rollout_metrics(pairs.first, config.sampling.eos_id),
            "preference": jnp.mean(batch["preferences"]),
            "kl": jnp.mean(policy_first - batch["ref_first_logps"]),
        }

    return update


def make_nash_md_step(
    models: NashMDModels, tx: optax.GradientTransformation, config: NashMDConfig
) -> StepFn:
    """The pure step with a reward-model preference, ``step(state, prompts, rng)``.

    Samples the pairs, labels them with ``σ(r(y₁) − r(y₂))`` using
    ``state.extra["reward_params"]`` and takes the update of :func:`make_nash_md_update`;
    metrics add ``reward_score``, the reward model's mean score of the first responses.
    """
    if models.reward is None:
        raise ValueError(
            "make_nash_md_step needs models.reward; with a host oracle use "
            "make_nash_md_generate, oracle_preferences and make_nash_md_update"
        )
    generate_pairs = make_nash_md_generate(models, config)
    update = make_nash_md_update(models, tx, config)

    def step(state: TrainState, prompts: Mapping[str, Array], rng: Array):
        sample_key, update_key = jax.random.split(rng)
        pairs = generate_pairs(state, prompts, sample_key)
        reward_params = state.extra["reward_params"]
        preferences = reward_model_preferences(models.reward, reward_params, pairs)
        scores = sequence_scores(
            models.reward, reward_params, pairs.first.tokens, pairs.first.attention_mask
        )
        state, metrics = update(state, pairs, preferences, update_key)
        return state, {**metrics, "reward_score": jnp.mean(scores)}

    return step


def init_nash_md_extra(
    *, reference_params: PyTree, reward_params: PyTree | None = None
) -> dict[str, Any]:
    """``state.extra`` of a Nash-MD run: the frozen reference (and reward model)."""
    extra = {"reference_params": reference_params}
    if reward_params is not None:
        extra["reward_params"] = reward_params
    return extra
