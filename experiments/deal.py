"""DeAL decoding on the embedded task: reward-guided lookahead search against plain decoding.

An SFT policy (``--config.init_from``) answers the first ``num_eval_prompts`` held-out
prompts with

- ``sampling``: plain sampling at ``temperature`` (the policy's own distribution);
- ``greedy`` and (when ``beam_width > 1``) ``beam``: the search with ``λ = 0``, i.e.
  greedy decoding and beam search of ``beam_width``;
- ``deal_rm_λ`` for every ``λ`` in ``reward_weights``: the search guided by the reward
  model (``--config.reward_from``) minus ``cost_weight`` times the cost model
  (``--config.cost_from``, optional): ``R = r_RM − μ c_CM`` (Huang et al., 2024, "DeAL");
- ``deal_keyword`` when ``keyword`` is set: the search guided by the programmatic
  keyword-inclusion reward with weight ``keyword_weight``.

Every reply is decoded and scored with the task's gold reward and cost; the table reports
the gold reward (± its standard error), gold cost, harm rate, the reward and cost models'
scores, the share of replies that contain the keyword and the mean reply length. The run writes
``summary.json`` and ``results.md`` (the table) into the workdir.

``python experiments/deal.py --config=experiments/configs/deal.py --workdir=runs/deal
--config.init_from=runs/pipeline/sft --config.reward_from=runs/pipeline/reward_model
--config.cost_from=runs/pipeline/cost_model``
"""

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments import common
from experiments import ppo as rl
from rlhf_jax.data import task_batches
from rlhf_jax.data.embedded_task import gold_cost, gold_reward
from rlhf_jax.data.tokenizers import Tokenizer
from rlhf_jax.sampling import SamplingConfig, sample
from rlhf_jax.sampling.deal import (
    DeALConfig,
    KeywordReward,
    ModelReward,
    RewardFn,
    WeightedReward,
    deal_decode,
)
from rlhf_jax.train.config import ConfigError, Field
from rlhf_jax.train.steps.common import split_model

SCHEMA = {
    "reward_from": Field(str),
    "cost_from": Field(str),
    "prompt_length": Field(int, minimum=1),
    "max_new_tokens": Field(int, minimum=1),
    "num_eval_prompts": Field(int, minimum=1),
    "temperature": Field(float, minimum=1e-6),
    "beam_width": Field(int, minimum=1),
    "num_candidates": Field(int, minimum=1),
    "lookahead": Field(int, minimum=0),
    "reward_weights": Field(tuple),
    "cost_weight": Field(float, minimum=0.0),
    "keyword": Field(str),
    "keyword_weight": Field(float, minimum=0.0),
}
RESULTS_FILE = "results.md"
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("gold_reward", "gold reward", "{:.3f}"),
    ("gold_reward_stderr", "± s.e.", "{:.3f}"),
    ("gold_cost", "gold cost", "{:.3f}"),
    ("harm_rate", "harm rate", "{:.3f}"),
    ("rm_score", "RM score", "{:.3f}"),
    ("cm_score", "CM score", "{:.3f}"),
    ("keyword_rate", "keyword rate", "{:.3f}"),
    ("length", "length", "{:.1f}"),
)
DecodeFn = Callable[[Mapping[str, np.ndarray], int], tuple[np.ndarray, np.ndarray]]
"""``decode(prompt batch, batch index) -> (tokens, response_mask)`` as numpy arrays."""


def validate(config: ml_collections.ConfigDict) -> None:
    """:func:`common.validate` plus the search's own constraints, naming the key."""
    common.validate(config, SCHEMA)
    if config.num_candidates < config.beam_width:
        raise ConfigError(
            f"config.num_candidates={config.num_candidates} must be >= "
            f"config.beam_width={config.beam_width}"
        )
    needed = config.prompt_length + config.max_new_tokens + config.lookahead
    if needed > config.max_length:
        raise ConfigError(
            f"config.prompt_length + config.max_new_tokens + config.lookahead = {needed} "
            f"exceeds config.max_length={config.max_length}"
        )
    for weight in config.reward_weights:
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            raise ConfigError(
                f"config.reward_weights: got {config.reward_weights!r}; expected numbers >= 0"
            )


def decode_texts(tokens: np.ndarray, response_mask: np.ndarray, tokenizer: Tokenizer) -> list[str]:
    """The replies' texts: the tokens under ``response_mask`` of each row, decoded."""
    mask = np.asarray(response_mask, bool)
    return [tokenizer.decode(row[keep]) for row, keep in zip(np.asarray(tokens), mask, strict=True)]


def reply_metrics(
    prompts: Sequence[str],
    replies: Sequence[str],
    *,
    keyword: str = "",
    rm_scores: np.ndarray | None = None,
) -> dict[str, float]:
    """Gold reward (mean and standard error), gold cost, harm rate, keyword rate, length."""
    rewards = np.asarray([gold_reward(x, y) for x, y in zip(prompts, replies, strict=True)])
    costs = np.asarray([gold_cost(x, y) for x, y in zip(prompts, replies, strict=True)])
    metrics = {
        "gold_reward": float(rewards.mean()),
        "gold_reward_stderr": float(rewards.std(ddof=1) / np.sqrt(len(rewards)))
        if len(rewards) > 1
        else 0.0,
        "gold_cost": float(costs.mean()),
        "harm_rate": float(np.mean(costs > 0)),
        "length": float(np.mean([len(y) for y in replies])),
    }
    if keyword:
        metrics["keyword_rate"] = float(np.mean([keyword.lower() in y.lower() for y in replies]))
    if rm_scores is not None:
        metrics["rm_score"] = float(np.mean(rm_scores))
    return metrics


def markdown_table(
    rows: Mapping[str, Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]
) -> str:
    """A Markdown table, one row per method; columns absent from every row are left out."""
    present = [c for c in columns if any(c[0] in r for r in rows.values())]
    lines = [
        "| method | " + " | ".join(title for _, title, _ in present) + " |",
        "| --- |" + " --- |" * len(present),
    ]
    for name, row in rows.items():
        cells = [fmt.format(row[key]) if key in row else "" for key, _, fmt in present]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_decoder(
    decode: DecodeFn, arrays: Mapping[str, np.ndarray], batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """``decode`` over fixed-shape batches of prompts; the real rows' tokens and masks."""
    tokens, masks = [], []
    for index, (batch, valid) in enumerate(
        task_batches.sequential_batches(arrays, batch_size=batch_size)
    ):
        batch_tokens, batch_mask = decode(batch, index)
        tokens.append(np.asarray(batch_tokens)[:valid])
        masks.append(np.asarray(batch_mask)[:valid])
    return np.concatenate(tokens), np.concatenate(masks)


def guide(config: ml_collections.ConfigDict) -> tuple[RewardFn, Any, dict[str, tuple]]:
    """The model guide ``R = r_RM − μ c_CM``: reward fn, its params and the scorers' ``(g, p)``.

    The scorers are ``{"rm": ...}`` plus ``{"cm": ...}`` when ``cost_from`` is set; the
    cost model joins the guide only when ``cost_weight > 0``.
    """
    reward_graphdef, reward_params, _ = rl.load_scorer(
        config.reward_from, "reward_from", config.seed
    )
    scorers = {"rm": (reward_graphdef, reward_params)}
    terms: list[tuple[float, RewardFn]] = [(1.0, ModelReward(reward_graphdef))]
    params: list[Any] = [reward_params]
    if config.cost_from:
        cost_graphdef, cost_params, _ = rl.load_scorer(config.cost_from, "cost_from", config.seed)
        scorers["cm"] = (cost_graphdef, cost_params)
        if config.cost_weight > 0.0:
            terms.append((-config.cost_weight, ModelReward(cost_graphdef)))
            params.append(cost_params)
    return WeightedReward(tuple(terms)), tuple(params), scorers


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Decode held-out prompts every way of the module docstring; write the table."""
    validate(config)
    if not config.init_from:
        raise ConfigError("config.init_from must name the workdir of an SFT run")
    os.makedirs(workdir, exist_ok=True)
    tokenizer = common.build_tokenizer(config)
    task = common.build_task(config)
    architecture = common.model_config(config, tokenizer)
    policy_graphdef, policy_params = split_model(common.build_decoder(config, architecture))
    reward_fn, reward_params, scorers = guide(config)
    texts = [p.text for p in task.heldout_prompts[: config.num_eval_prompts]]
    arrays = task_batches.task_prompt_arrays(texts, tokenizer, max_length=config.prompt_length)
    arrays = {k: arrays[k] for k in ("input_ids", "attention_mask")}

    def sampled(batch, index):
        sampling = SamplingConfig(
            max_new_tokens=config.max_new_tokens,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            temperature=config.temperature,
        )
        output = sample(
            policy_graphdef,
            policy_params,
            batch["input_ids"],
            batch["attention_mask"],
            jax.random.key(config.seed * 1000 + index),
            config=sampling,
        )
        return output.tokens, output.response_mask

    def searched(fn: RewardFn, fn_params: Any, weight: float, beam_width: int) -> DecodeFn:
        search = DeALConfig(
            max_new_tokens=config.max_new_tokens,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            beam_width=beam_width,
            num_candidates=config.num_candidates,
            lookahead=config.lookahead if weight else 0,
            reward_weight=float(weight),
        )

        def decode(batch, index):
            del index
            output = deal_decode(
                policy_graphdef,
                policy_params,
                fn,
                fn_params,
                batch["input_ids"],
                batch["attention_mask"],
                config=search,
            )
            return output.tokens, output.response_mask

        return decode

    methods: dict[str, DecodeFn] = {
        "sampling": sampled,
        "greedy": searched(reward_fn, reward_params, 0.0, 1),
    }
    if config.beam_width > 1:
        methods["beam"] = searched(reward_fn, reward_params, 0.0, config.beam_width)
    for weight in config.reward_weights:
        if weight:
            methods[f"deal_rm_{weight:g}"] = searched(
                reward_fn, reward_params, weight, config.beam_width
            )
    if config.keyword:
        keyword_fn = KeywordReward(tuple(int(t) for t in tokenizer.encode(config.keyword)))
        methods["deal_keyword"] = searched(
            keyword_fn, None, config.keyword_weight, config.beam_width
        )
    results = {}
    for name, decode in methods.items():
        tokens, mask = run_decoder(decode, arrays, config.eval_batch_size)
        attention = np.concatenate(
            [arrays["attention_mask"], mask[:, config.prompt_length :]], axis=1
        ).astype(np.int32)
        scores = {
            key: np.asarray(rl.score_sequences(graphdef, params, tokens, attention))
            for key, (graphdef, params) in scorers.items()
        }
        replies = decode_texts(tokens, mask, tokenizer)
        results[name] = reply_metrics(
            texts, replies, keyword=config.keyword, rm_scores=scores["rm"]
        )
        if "cm" in scores:
            results[name]["cm_score"] = float(np.mean(scores["cm"]))
        results[name]["example"] = f"{texts[0]!r} -> {replies[0]!r}"
    table = markdown_table(results, COLUMNS)
    with open(os.path.join(workdir, RESULTS_FILE), "w") as f:
        f.write(f"DeAL on {len(texts)} held-out prompts\n\n{table}")
    print(table)
    return common.finish(workdir, "DeAL", {"num_prompts": len(texts), "methods": results})


if __name__ == "__main__":
    common.main(run)
