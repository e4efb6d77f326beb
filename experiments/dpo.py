"""Direct preference optimisation (DPO family) on the embedded task's helpfulness pairs.

The policy starts from ``init_from``'s SFT policy (or a fresh decoder), which is also the
frozen reference. ``reference="in_step"`` keeps the reference parameters in the state and
evaluates them in every step; ``"precomputed"`` computes the reference log-probs of the
whole data set once before training. The summary reports the held-out implicit-reward
accuracy and margins, ``β log π/π_ref`` of the chosen and rejected responses.

``config.loss_name`` selects any loss of ``PREFERENCE_LOSSES``; the losses that read more
than the pair get their extra rows here:

- ``"selm"``: one response per pair sampled from the frozen reference (the SFT policy)
  before training, ``y_ref ∼ π_ref(·|x)`` at temperature 1, ``explore_max_new_tokens``
  tokens at most (a reply cut there gets an eos when re-tokenised);
- ``"rationale_dpo"``: a rationale per pair written from the task's gold reward
  breakdown (:func:`rationale_text`), the answer to "why is the first reply better?"
  shown after the prompt and both replies (clipped to fit ``max_length``). A pair whose
  label contradicts the gold reward has no rationale (``has_rationale = 0``): an
  annotator who preferred the worse reply has no reason to give.

``config.flip_preferences=True`` swaps the chosen and rejected reply of every training and
held-out pair (:func:`flip_preferences`): the run learns the *reverse* preference, the
reverse DPO model of AlignDistil's contrastive teacher (Zhang et al., 2025), and its
held-out accuracy and margins are measured against the flipped labels too.

``python experiments/dpo.py --config=experiments/configs/dpo.py --workdir=runs/dpo
--config.init_from=runs/sft``
"""

import collections
import dataclasses
import inspect
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import ml_collections
import numpy as np

from experiments import common
from rlhf_jax.data import task_batches
from rlhf_jax.data.chat import render_prompt, render_response
from rlhf_jax.data.embedded_task import REWARD_WEIGHTS, PreferencePair, reward_breakdown
from rlhf_jax.data.tokenizers import Tokenizer
from rlhf_jax.train.config import ConfigError, Field
from rlhf_jax.train.loop import EpochPermutationSchedule
from rlhf_jax.train.state import PyTree, TrainState
from rlhf_jax.train.steps import (
    initial_dpo_extra,
    make_dpo_eval,
    make_dpo_step,
    precompute_reference_logps,
    split_model,
)
from rlhf_jax.train.steps.dpo import PREFERENCE_LOSSES

SCHEMA = {
    "loss_name": Field(str, choices=tuple(sorted(PREFERENCE_LOSSES))),
    "reference": Field(str, choices=("in_step", "precomputed")),
    "prompt_length": Field(int, minimum=1),
    "explore_max_new_tokens": Field(int, minimum=1),
    "flip_preferences": Field(bool),
}
SHARED_ARGUMENTS = ("chosen_lengths", "rejected_lengths", "reduction")
GROUP_KEYS = ("input_ids", "attention_mask", "response_mask")
REASONS = {
    "relevance": "uses more of the words the question asks about",
    "topic": "stays closer to the topic",
    "specificity": "gives more specific numbers and units",
    "politeness": "is more polite",
    "rudeness": "is less rude",
    "length": "is more complete",
    "repetition": "repeats itself less",
}
"""What a rationale says about each feature of the gold reward that favours the chosen reply."""


def validate_hyper(config: ml_collections.ConfigDict) -> dict:
    """``config.hyper`` as keywords of the chosen loss; an unknown key is named in the error."""
    spec = PREFERENCE_LOSSES[config.loss_name]
    data_inputs = set(spec.inputs(collections.defaultdict(lambda: None)))
    parameters = inspect.signature(spec.fn).parameters
    known = [
        name
        for name, p in parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
        and name not in SHARED_ARGUMENTS
        and name not in data_inputs
    ]
    for key, value in config.hyper.items():
        if key not in known:
            raise ConfigError(
                f"config.hyper.{key}: not a hyper-parameter of {config.loss_name!r}; "
                f"expected one of {known}"
            )
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"config.hyper.{key}: got {value!r}; expected a number or string")
    return config.hyper.to_dict()


def flip_preferences(pairs: tuple[PreferencePair, ...]) -> tuple[PreferencePair, ...]:
    """The pairs with the helpfulness label reversed: the rejected reply becomes the chosen."""
    return tuple(dataclasses.replace(p, better_response_id=1 - p.better_response_id) for p in pairs)


def rationale_text(prompt: str, chosen: str, rejected: str) -> str | None:
    """Why ``chosen`` beats ``rejected`` on the gold reward: its two largest advantages.

    The weighted feature differences ``w_k (f_k(chosen) − f_k(rejected))`` of
    :func:`rlhf_jax.data.embedded_task.reward_breakdown` are ranked and the (at most two)
    positive ones are named; ``None`` when the chosen reply has no advantage.
    """
    better, worse = reward_breakdown(prompt, chosen), reward_breakdown(prompt, rejected)
    gains = {k: w * (getattr(better, k) - getattr(worse, k)) for k, w in REWARD_WEIGHTS.items()}
    reasons = [REASONS[k] for k, gain in sorted(gains.items(), key=lambda kv: -kv[1]) if gain > 0]
    if better.total <= worse.total or not reasons:
        return None
    return "The first reply " + " and ".join(reasons[:2]) + "."


def rationale_turns(prompt: str, chosen: str, rejected: str, clip: int) -> list[tuple[str, str]]:
    """The rationale's context: the prompt and both replies (each clipped to ``clip`` chars)."""
    question = (
        f"{prompt}\nFirst reply: {chosen[:clip]}\nSecond reply: {rejected[:clip]}\n"
        "Why is the first reply better?"
    )
    return [("human", question)]


def group_arrays(
    turns: list[list[tuple[str, str]]],
    responses: list[str],
    tokenizer: Tokenizer,
    *,
    group: str,
    max_length: int,
) -> dict[str, np.ndarray]:
    """``<group>_{input_ids, attention_mask, response_mask}`` rows of (context, response)."""
    arrays = task_batches.preference_arrays(
        turns, responses, responses, tokenizer, max_length=max_length
    )
    return {f"{group}_{key}": arrays[f"chosen_{key}"] for key in GROUP_KEYS}


def rationale_arrays(
    pairs: tuple[PreferencePair, ...], arrays: dict, tokenizer: Tokenizer, max_length: int
) -> dict[str, np.ndarray]:
    """The ``rationale_*`` rows and ``has_rationale`` flags of preference pairs.

    The replies in the context are clipped so that context and rationale fit
    ``max_length`` tokens (exactly for a byte tokenizer).
    """
    turns, texts, flags = [], [], []
    for pair in pairs:
        chosen, rejected = (
            (pair.response_0, pair.response_1)
            if pair.better_response_id == 0
            else (pair.response_1, pair.response_0)
        )
        text = rationale_text(pair.prompt, chosen, rejected)
        flags.append(text is not None)
        text = text or "None."
        empty = render_prompt(rationale_turns(pair.prompt, "", "", 0), tokenizer)
        room = max_length - len(empty) - len(render_response(text, tokenizer))
        turns.append(rationale_turns(pair.prompt, chosen, rejected, max(room // 2, 0)))
        texts.append(text)
    rows = group_arrays(turns, texts, tokenizer, group="rationale", max_length=max_length)
    return {**arrays, **rows, "has_rationale": np.asarray(flags, np.float32)}


def sample_in_batches(
    graphdef, params: PyTree, prompts: list[str], tokenizer: Tokenizer, config
) -> list[str]:
    """Replies of a policy to ``prompts`` in fixed-size batches (one compilation)."""
    size = config.eval_batch_size
    padded = prompts + prompts[:1] * (-len(prompts) % size)
    replies = []
    for start in range(0, len(padded), size):
        replies += common.sample_replies(
            graphdef,
            params,
            padded[start : start + size],
            tokenizer,
            prompt_length=config.prompt_length,
            max_new_tokens=config.explore_max_new_tokens,
            temperature=1.0,
            seed=config.seed + start,
        )
    return replies[: len(prompts)]


def explore_arrays(
    pairs: tuple[PreferencePair, ...], arrays: dict, tokenizer: Tokenizer, reference, config
) -> dict[str, np.ndarray]:
    """The ``explore_*`` rows: one reply per pair sampled from the reference policy."""
    prompts = [pair.prompt for pair in pairs]
    replies = sample_in_batches(*reference, prompts, tokenizer, config)
    turns = [[("human", prompt)] for prompt in prompts]
    rows = group_arrays(turns, replies, tokenizer, group="explore", max_length=config.max_length)
    return {**arrays, **rows}


def with_extra_groups(config, pairs, arrays, tokenizer, reference) -> dict[str, np.ndarray]:
    """The preference arrays plus the rows and flags the chosen loss reads."""
    if config.loss_name == "selm":
        return explore_arrays(pairs, arrays, tokenizer, reference, config)
    if config.loss_name == "rationale_dpo":
        return rationale_arrays(pairs, arrays, tokenizer, config.max_length)
    return arrays


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train the policy with the named pairwise loss, evaluate it and export it."""
    common.validate(config, {**SCHEMA, "hyper": Field(ml_collections.ConfigDict)})
    hyper = validate_hyper(config)
    tokenizer = common.build_tokenizer(config)
    task = common.build_task(config)
    architecture = common.model_config(config, tokenizer)
    graphdef, params = split_model(common.build_decoder(config, architecture))
    reference_params = jax.tree.map(lambda x: x.copy(), params)
    train_pairs, heldout_pairs = task.preference_train, task.preference_heldout
    if config.flip_preferences:
        train_pairs, heldout_pairs = flip_preferences(train_pairs), flip_preferences(heldout_pairs)
    train, heldout = (
        with_extra_groups(
            config,
            pairs,
            task_batches.task_preference_arrays(pairs, tokenizer, max_length=config.max_length),
            tokenizer,
            (graphdef, reference_params),
        )
        for pairs in (train_pairs, heldout_pairs)
    )
    if config.reference == "precomputed":
        train, heldout = (
            precompute_reference_logps(
                graphdef,
                reference_params,
                arrays,
                batch_size=config.eval_batch_size,
                loss_name=config.loss_name,
            )
            for arrays in (train, heldout)
        )
    tx = common.build_optimizer(config)
    options = {"loss_name": config.loss_name, "hyper": hyper, "reference": config.reference}
    step = make_dpo_step(graphdef, tx, num_micro_batches=config.num_micro_batches, **options)
    evaluate = make_dpo_eval(graphdef, batch_size=config.eval_batch_size, **options)
    extra = initial_dpo_extra(
        config.loss_name, reference=config.reference, reference_params=reference_params
    )
    schedule = EpochPermutationSchedule(train, config.batch_size, seed=config.seed)
    state = TrainState.create(params, tx, rng=config.seed, extra=extra)
    state, run_summary, history = common.train(step, state, schedule, config, workdir)
    final = evaluate(state, heldout)
    common.export_params(workdir, "policy", state.params, architecture)
    summary = {
        "loss_name": config.loss_name,
        "flip_preferences": config.flip_preferences,
        "steps": run_summary.final_step,
        "train_loss_first": history[0]["loss"],
        "train_loss_last": history[-1]["loss"],
        "train_reward_accuracy_last": history[-1]["reward_accuracy"],
        **{f"heldout_{k}": v for k, v in final.items() if k != "denominator"},
    }
    return common.finish(workdir, f"{config.loss_name} policy", summary)


if __name__ == "__main__":
    common.main(run)
