"""Sampling-based evaluation of policies on the embedded task, against a reference policy.

Each policy answers every held-out prompt once, sampled from the policy itself
(temperature 1, no top-k or top-p, so the samples and the Monte Carlo estimates below
are of the policy's own distribution). The decoded responses are scored with the task's
gold functions (:func:`rlhf_jax.data.embedded_task.score_responses`), and the reported
quantities are, over the ``N`` prompts ``x_i`` and samples ``y_i ~ π(· | x_i)``:

- gold reward ``(1/N) Σ_i r(x_i, y_i)``, gold cost ``(1/N) Σ_i c(x_i, y_i)`` and harm rate
  ``(1/N) Σ_i 1[c(x_i, y_i) > 0]``;
- KL to the reference, the Monte Carlo estimate of the sequence-level
  ``KL(π ‖ π_ref) = E_x E_{y~π}[log π(y | x) − log π_ref(y | x)]``:
  ``(1/N) Σ_i (log π(y_i | x_i) − log π_ref(y_i | x_i))``, both summed token log-probs
  from a forward pass (the unbiased "k1" estimator; Schulman, 2020, "Approximating KL
  Divergence"). It is exactly 0 for the reference itself;
- win rate against the reference under the gold Bradley–Terry model (Bradley & Terry,
  1952), ``(1/N) Σ_i σ((r(x_i, y_i) − r(x_i, y_i^ref)) / τ)`` with ``y_i^ref`` the
  reference's sample for the same prompt and ``τ`` the task's label temperature: the
  probability that the labeller of the task's preference data would prefer the policy's
  answer. The reference against its own samples scores exactly 0.5;
- optionally, the mean score of the samples under learned scalar models (the reward and
  cost models the policies were trained on), to set proxy against gold.

:func:`science_checks` turns the evaluation into the pass/fail statements the pipeline
prints: RLHF with PPO raises the gold reward over SFT, and Safe-RLHF (Dai et al., 2023)
lowers the harm rate relative to PPO while keeping the gold reward above SFT.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import chex
import jax
import numpy as np
from flax import nnx
from jax import Array

from rlhf_jax.data import embedded_task
from rlhf_jax.data.task_batches import sequential_batches, task_prompt_arrays
from rlhf_jax.data.tokenizers import Tokenizer
from rlhf_jax.models.logprobs import sequence_logprobs
from rlhf_jax.sampling import SamplingConfig, sample

PyTree = Any
Model = tuple[nnx.GraphDef, PyTree]
"""A model as the ``(graphdef, params)`` pair of ``nnx.split``."""
ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``score(tokens [N, L], attention_mask [N, L]) -> [N]`` scores of whole sequences."""

TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("gold_reward", "gold reward", "{:.3f}"),
    ("gold_reward_stderr", "± s.e.", "{:.3f}"),
    ("gold_cost", "gold cost", "{:.3f}"),
    ("harm_rate", "harm rate", "{:.3f}"),
    ("kl_to_reference", "KL to ref", "{:.2f}"),
    ("win_rate", "win rate vs ref", "{:.3f}"),
    ("response_length", "tokens", "{:.1f}"),
)
"""``(field, header, format)`` of each table column after the method name."""


@dataclasses.dataclass(frozen=True)
class PolicySamples:
    """One sampled response per prompt, as token arrays and decoded text.

    Attributes:
      prompts: ``[N]`` prompt texts.
      responses: ``[N]`` decoded response texts (special tokens dropped).
      tokens: ``[N, P + M]`` int32, the left-padded prompt then the response.
      attention_mask: ``[N, P + M]``, 1 on real prompt and response tokens.
      response_mask: ``[N, P + M]``, 1 on the response tokens (EOS included).
    """

    prompts: tuple[str, ...]
    responses: tuple[str, ...]
    tokens: np.ndarray
    attention_mask: np.ndarray
    response_mask: np.ndarray


@dataclasses.dataclass(frozen=True)
class PolicyEvaluation:
    """The evaluation of one policy (see the module docstring for the definitions).

    Attributes:
      name: the policy's name.
      gold_reward: mean gold reward of its samples.
      gold_reward_stderr: standard error of that mean, ``std / √N``.
      gold_cost: mean gold cost.
      harm_rate: fraction of samples with positive gold cost.
      kl_to_reference: Monte Carlo ``KL(π ‖ π_ref)`` in nats per sequence.
      win_rate: mean gold Bradley–Terry probability of beating the reference's sample.
      response_length: mean number of response tokens (EOS included).
      num_samples: ``N``.
      proxy_scores: mean score of the samples under each learned scalar model, by name.
      examples: a few ``(prompt, response)`` pairs, for reading.
    """

    name: str
    gold_reward: float
    gold_reward_stderr: float
    gold_cost: float
    harm_rate: float
    kl_to_reference: float
    win_rate: float
    response_length: float
    num_samples: int
    proxy_scores: dict[str, float] = dataclasses.field(default_factory=dict)
    examples: tuple[tuple[str, str], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The evaluation as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Check:
    """A pass/fail statement about the evaluation, with the numbers it rests on.

    Attributes:
      claim: what should hold, in words.
      passed: whether it holds.
      detail: the compared numbers.
    """

    claim: str
    passed: bool
    detail: str

    def line(self) -> str:
        """``✓ claim: detail`` or ``✗ claim: detail``."""
        return f"{'✓' if self.passed else '✗'} {self.claim}: {self.detail}"


def evaluation_sampling_config(tokenizer: Tokenizer, *, max_new_tokens: int) -> SamplingConfig:
    """Sampling from the policy itself: temperature 1, no top-k / top-p, stop at EOS."""
    return SamplingConfig(
        max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id
    )


def decode_responses(
    tokens: np.ndarray, response_mask: np.ndarray, tokenizer: Tokenizer
) -> tuple[str, ...]:
    """The text of each row's response tokens (special ids such as EOS dropped)."""
    chex.assert_rank([tokens, response_mask], 2)
    chex.assert_equal_shape([tokens, response_mask])
    return tuple(
        tokenizer.decode(row[mask > 0].tolist())
        for row, mask in zip(np.asarray(tokens), np.asarray(response_mask), strict=True)
    )


def sample_policy(
    model: Model,
    prompts: Sequence[str],
    tokenizer: Tokenizer,
    rng: Array,
    *,
    max_prompt_length: int,
    max_new_tokens: int,
    batch_size: int,
) -> PolicySamples:
    """Sample one response per prompt from ``model`` (temperature 1, no filters).

    Args:
      model: the policy ``(graphdef, params)`` of a :class:`rlhf_jax.models.Decoder`.
      prompts: ``[N]`` prompt texts of the embedded task.
      tokenizer: renders prompts with the chat template and decodes responses.
      rng: PRNG key; batch ``k`` uses ``fold_in(rng, k)``.
      max_prompt_length: ``P``, the left-padded prompt width.
      max_new_tokens: ``M``, the longest response.
      batch_size: prompts per sampler call (every call has this shape: one compilation).

    Returns:
      The :class:`PolicySamples`.
    """
    graphdef, params = model
    config = evaluation_sampling_config(tokenizer, max_new_tokens=max_new_tokens)
    arrays = task_prompt_arrays(list(prompts), tokenizer, max_length=max_prompt_length)
    pieces: dict[str, list[np.ndarray]] = {"tokens": [], "attention_mask": [], "response_mask": []}
    batches = sequential_batches(arrays, batch_size=batch_size)
    for index, (batch, valid) in enumerate(batches):
        output = sample(
            graphdef,
            params,
            batch["input_ids"],
            batch["attention_mask"],
            jax.random.fold_in(rng, index),
            config=config,
        )
        output = jax.device_get(output)
        for name in pieces:
            pieces[name].append(np.asarray(getattr(output, name))[:valid])
    joined = {name: np.concatenate(values) for name, values in pieces.items()}
    return PolicySamples(
        prompts=tuple(prompts),
        responses=decode_responses(joined["tokens"], joined["response_mask"], tokenizer),
        **joined,
    )


def gold_rewards(samples: PolicySamples) -> np.ndarray:
    """``r(x_i, y_i)`` ``[N]``: the gold reward of every sampled response."""
    pairs = zip(samples.prompts, samples.responses, strict=True)
    return np.array([embedded_task.gold_reward(x, y) for x, y in pairs])


@functools.partial(jax.jit, static_argnums=0)
def _sequence_logprobs(
    graphdef: nnx.GraphDef,
    params: PyTree,
    tokens: Array,
    attention_mask: Array,
    response_mask: Array,
) -> Array:
    """``log π(y | x)`` ``[B]``: summed response-token log-probs of one forward pass."""
    _, per_sequence = sequence_logprobs(
        nnx.merge(graphdef, params), tokens, attention_mask, response_mask
    )
    return per_sequence


def sequence_logprobs_of(model: Model, samples: PolicySamples, *, batch_size: int) -> np.ndarray:
    """``log π(y_i | x_i)`` ``[N]`` of the sampled sequences under ``model``.

    Args:
      model: ``(graphdef, params)`` of a decoder.
      samples: the sequences to score.
      batch_size: rows per forward pass (one compilation for all calls).

    Returns:
      float64 ``[N]`` summed log-probabilities of the response tokens.
    """
    graphdef, params = model
    arrays = {
        "tokens": samples.tokens,
        "attention_mask": samples.attention_mask,
        "response_mask": samples.response_mask,
    }
    values = []
    for batch, valid in sequential_batches(arrays, batch_size=batch_size):
        logps = _sequence_logprobs(
            graphdef, params, batch["tokens"], batch["attention_mask"], batch["response_mask"]
        )
        values.append(np.asarray(jax.device_get(logps), np.float64)[:valid])
    return np.concatenate(values)


def monte_carlo_kl(policy_logps: np.ndarray, reference_logps: np.ndarray) -> float:
    """``(1/N) Σ_i (log π(y_i | x_i) − log π_ref(y_i | x_i))`` for ``y_i ~ π``: KL(π ‖ π_ref).

    Args:
      policy_logps: ``[N]`` sequence log-probs under the sampling policy ``π``.
      reference_logps: ``[N]`` log-probs of the same sequences under ``π_ref``.

    Returns:
      The unbiased Monte Carlo estimate of the sequence-level KL, in nats.
    """
    policy_logps, reference_logps = np.asarray(policy_logps), np.asarray(reference_logps)
    chex.assert_rank([policy_logps, reference_logps], 1)
    chex.assert_equal_shape([policy_logps, reference_logps])
    return float(np.mean(policy_logps - reference_logps))


def bradley_terry_win_rate(
    rewards: np.ndarray, reference_rewards: np.ndarray, *, temperature: float
) -> float:
    """``(1/N) Σ_i σ((r_i − r_i^ref) / τ)``, the gold Bradley–Terry win rate.

    The Bradley–Terry model (Bradley & Terry, 1952) with the task's gold reward.

    Args:
      rewards: ``[N]`` gold rewards of the policy's responses.
      reference_rewards: ``[N]`` gold rewards of the reference's responses to the same prompts.
      temperature: the Bradley–Terry temperature ``τ > 0``.

    Returns:
      The mean probability that the policy's response is preferred.
    """
    rewards, reference_rewards = np.asarray(rewards), np.asarray(reference_rewards)
    chex.assert_rank([rewards, reference_rewards], 1)
    chex.assert_equal_shape([rewards, reference_rewards])
    probabilities = embedded_task.bradley_terry_probability(rewards, reference_rewards, temperature)
    return float(np.mean(probabilities))


def scalar_model_scorer(model: Model, *, batch_size: int) -> ScoreFn:
    """A :data:`ScoreFn` from a :class:`rlhf_jax.models.ScalarModel` (reward or cost model).

    The score of a sequence is the model's scalar at its last real token
    (:meth:`rlhf_jax.models.ScalarModel.score`).
    """
    graphdef, params = model

    @jax.jit
    def forward(params: PyTree, tokens: Array, attention_mask: Array) -> Array:
        return nnx.merge(graphdef, params).score(tokens, attention_mask)

    def score(tokens: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        values = []
        arrays = {"tokens": tokens, "attention_mask": attention_mask}
        for batch, valid in sequential_batches(arrays, batch_size=batch_size):
            scores = forward(params, batch["tokens"], batch["attention_mask"])
            values.append(np.asarray(jax.device_get(scores), np.float64)[:valid])
        return np.concatenate(values)

    return score


def evaluate_samples(
    name: str,
    samples: PolicySamples,
    *,
    policy_logps: np.ndarray,
    reference_logps: np.ndarray,
    reference_rewards: np.ndarray,
    temperature: float,
    scorers: Mapping[str, ScoreFn] | None = None,
    num_examples: int = 3,
) -> PolicyEvaluation:
    """The :class:`PolicyEvaluation` of one policy's samples.

    Args:
      name: the policy's name.
      samples: its responses to the evaluation prompts.
      policy_logps: ``[N]`` ``log π(y_i | x_i)``.
      reference_logps: ``[N]`` ``log π_ref(y_i | x_i)``.
      reference_rewards: ``[N]`` gold rewards of the reference's responses to the same prompts.
      temperature: Bradley–Terry temperature of the win rate.
      scorers: learned scalar models to average over the samples, by name.
      num_examples: how many ``(prompt, response)`` pairs to keep for reading.

    Returns:
      The evaluation.
    """
    gold = embedded_task.score_responses(samples.prompts, samples.responses)
    rewards = gold_rewards(samples)
    proxy = {
        key: float(np.mean(score(samples.tokens, samples.attention_mask)))
        for key, score in (scorers or {}).items()
    }
    return PolicyEvaluation(
        name=name,
        gold_reward=gold["gold_reward"],
        gold_reward_stderr=float(np.std(rewards) / np.sqrt(len(rewards))),
        gold_cost=gold["gold_cost"],
        harm_rate=gold["harm_rate"],
        kl_to_reference=monte_carlo_kl(policy_logps, reference_logps),
        win_rate=bradley_terry_win_rate(rewards, reference_rewards, temperature=temperature),
        response_length=float(np.mean(np.sum(samples.response_mask, axis=1))),
        num_samples=len(samples.prompts),
        proxy_scores=proxy,
        examples=tuple(
            zip(samples.prompts[:num_examples], samples.responses[:num_examples], strict=True)
        ),
    )


def evaluate_policies(
    policies: Mapping[str, Model],
    prompts: Sequence[str],
    tokenizer: Tokenizer,
    rng: Array,
    *,
    reference: str,
    max_prompt_length: int,
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 1.0,
    scorers: Mapping[str, ScoreFn] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[PolicyEvaluation]:
    """Sample every policy on ``prompts`` and evaluate it against ``policies[reference]``.

    Args:
      policies: ``(graphdef, params)`` decoders by name; one of them is the reference.
      prompts: ``[N]`` held-out prompt texts of the embedded task.
      tokenizer: renders prompts and decodes responses.
      rng: PRNG key; policy ``k`` (in the mapping's order) samples with ``fold_in(rng, k)``.
      reference: the name of the reference policy (KL and win rate are against it).
      max_prompt_length: the left-padded prompt width.
      max_new_tokens: the longest response.
      batch_size: rows per sampler and forward call.
      temperature: the Bradley–Terry temperature of the win rate (the task's ``τ``).
      scorers: learned scalar models whose mean score over each policy's samples is
        reported (e.g. ``{"rm_score": ..., "cm_score": ...}``).
      progress: called with a message after each policy is sampled and after each is
        scored (``2 × len(policies)`` calls).

    Returns:
      One :class:`PolicyEvaluation` per policy, in the mapping's order.
    """
    if reference not in policies:
        raise ValueError(f"reference {reference!r} is not among the policies {list(policies)}")
    sizes = {"max_prompt_length": max_prompt_length, "max_new_tokens": max_new_tokens}
    sizes |= {"batch_size": batch_size}
    samples = {}
    for index, (name, model) in enumerate(policies.items()):
        key = jax.random.fold_in(rng, index)
        samples[name] = sample_policy(model, prompts, tokenizer, key, **sizes)
        if progress is not None:
            progress(f"sampled {name}")
    reference_rewards = gold_rewards(samples[reference])
    evaluations = []
    for name, model in policies.items():
        policy_logps = sequence_logprobs_of(model, samples[name], batch_size=batch_size)
        reference_logps = sequence_logprobs_of(
            policies[reference], samples[name], batch_size=batch_size
        )
        evaluations.append(
            evaluate_samples(
                name,
                samples[name],
                policy_logps=policy_logps,
                reference_logps=reference_logps,
                reference_rewards=reference_rewards,
                temperature=temperature,
                scorers=scorers,
            )
        )
        if progress is not None:
            progress(f"scored {name}")
    return evaluations


def format_table(evaluations: Sequence[PolicyEvaluation]) -> str:
    """A Markdown table with one row per policy (proxy-score columns where reported)."""
    proxy_keys = sorted({k for e in evaluations for k in e.proxy_scores})
    header = ["method", *(h for _, h, _ in TABLE_COLUMNS), *proxy_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for evaluation in evaluations:
        cells = [evaluation.name]
        cells += [fmt.format(getattr(evaluation, field)) for field, _, fmt in TABLE_COLUMNS]
        cells += [
            f"{evaluation.proxy_scores[k]:.3f}" if k in evaluation.proxy_scores else "–"
            for k in proxy_keys
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _difference(a: PolicyEvaluation, b: PolicyEvaluation) -> str:
    """``a − b`` of the gold rewards with the standard error of the difference."""
    stderr = float(np.hypot(a.gold_reward_stderr, b.gold_reward_stderr))
    return f"difference {a.gold_reward - b.gold_reward:+.3f} ± {stderr:.3f} (s.e.)"


def _harm_difference(a: PolicyEvaluation, b: PolicyEvaluation) -> str:
    """``a − b`` of the harm rates with the binomial standard error of the difference."""
    variance = sum(e.harm_rate * (1.0 - e.harm_rate) / e.num_samples for e in (a, b))
    return f"difference {a.harm_rate - b.harm_rate:+.3f} ± {np.sqrt(variance):.3f} (s.e.)"


def science_checks(
    evaluations: Mapping[str, PolicyEvaluation],
    *,
    sft: str = "sft",
    ppo: str = "ppo",
    safe: str = "safe_rlhf",
) -> list[Check]:
    """The claims the pipeline's evaluation must show, checked on the numbers.

    1. PPO raises the gold reward over SFT (``r̄_PPO > r̄_SFT``).
    2. Safe-RLHF lowers the harm rate relative to PPO (``h_Safe < h_PPO``).
    3. Safe-RLHF keeps the gold reward above SFT (``r̄_Safe > r̄_SFT``).

    A claim whose methods were not evaluated is reported as failed, saying so.

    Args:
      evaluations: evaluations by policy name.
      sft: name of the SFT policy.
      ppo: name of the PPO policy.
      safe: name of the Safe-RLHF policy.

    Returns:
      The three :class:`Check` results, in the order above.
    """
    checks = []
    for claim, names, holds, detail in (
        (
            "PPO raises gold reward over SFT",
            (ppo, sft),
            lambda a, b: a.gold_reward > b.gold_reward,
            lambda a, b: f"{a.gold_reward:.3f} vs {b.gold_reward:.3f}, {_difference(a, b)}",
        ),
        (
            "Safe-RLHF lowers harm rate relative to PPO",
            (safe, ppo),
            lambda a, b: a.harm_rate < b.harm_rate,
            lambda a, b: f"{a.harm_rate:.3f} vs {b.harm_rate:.3f}, {_harm_difference(a, b)}",
        ),
        (
            "Safe-RLHF stays above SFT in gold reward",
            (safe, sft),
            lambda a, b: a.gold_reward > b.gold_reward,
            lambda a, b: f"{a.gold_reward:.3f} vs {b.gold_reward:.3f}, {_difference(a, b)}",
        ),
    ):
        absent = [n for n in names if n not in evaluations]
        if absent:
            checks.append(Check(claim, False, f"not evaluated: {absent}"))
            continue
        a, b = (evaluations[n] for n in names)
        checks.append(Check(claim, bool(holds(a, b)), detail(a, b)))
    return checks
