"""Reward or cost model on the embedded task's preference pairs.

``model_kind="reward"`` learns the helpfulness labels (``better_response_id``) with the
Bradley–Terry loss, or Plackett–Luce over each pair as a ranked list of two
(``reward_loss="plackett_luce"``); ``model_kind="cost"`` learns the harmlessness labels
(``safer_response_id``) and safety flags with the Safe-RLHF cost loss (Dai et al., 2023).
The scalar model's trunk starts from ``init_from``'s SFT policy when given. The summary
puts the held-out accuracy next to the Bayes-optimal accuracy of the task's labels and
next to the accuracy of the gold reward (or cost) itself on the same pairs.

Reward-model variants (``model_kind="reward"``, ``reward_loss=...``), each prepared here:

- ``"strength"`` (Wang et al., 2024, "Secrets of RLHF II", §2): the reward-model runs
  named in ``strength.ensemble`` score every training pair; their mean score difference
  û is the preference strength. Pairs with ``û < strength.flip_threshold`` are flipped,
  pairs with ``û < strength.soft_threshold`` (after flipping) get the soft label
  ``1 − strength.smoothing``, and every pair gets the adaptive margin
  ``strength.margin_scale · û``. Held-out pairs keep their labels (p = 1, m = 0).
- ``"heron"`` (Bukharin et al., HERON): pairs are labelled by comparing the gold factors
  down the hierarchy ``heron.factors`` (``harmlessness`` = −gold cost, then the gold
  reward's features, oriented so larger is better), each level deciding when the two
  replies differ by more than ``heron.margin_scale`` standard deviations of the factor;
  the helpfulness labels of the task are not used.
- ``"binary_feedback"`` (Han et al., 2025, RLUF): each reply gets a sparse "love"
  reaction with probability ``σ((r − feedback.love_threshold)/τ)`` (r the gold reward, τ
  the task's temperature), and the model learns P[Love] from those bits alone, with
  class weights balancing the rare positives when ``feedback.balance_classes``. Its
  summary adds the held-out agreement of the learned score's order with the gold reward.

Any pairwise loss can train with residual dropout (``dropout_rate``), and the
Bradley–Terry, cost and strength losses can add the contrastive term of Secrets of RLHF II
(Wang et al., 2024, §3): ``contrastive_weight`` β times the SimCSE InfoNCE loss of the
difference representations ``h_c − h_r`` of two dropout views, at temperature
``contrastive_temperature`` (``experiments/configs/reward_contrastive.py``). The summary
then reports the last logged ``train_contrastive_loss`` and ``train_contrastive_accuracy``.
Evaluation always runs without dropout.

``python experiments/reward_model.py --config=experiments/configs/reward_model.py
--workdir=runs/rm --config.init_from=runs/sft``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from experiments import common
from experiments.ppo import load_scorer
from rlhf_jax.data import task_batches
from rlhf_jax.data.embedded_task import (
    PreferencePair,
    bayes_optimal_accuracy,
    gold_cost,
    reward_breakdown,
)
from rlhf_jax.models import ScalarModel
from rlhf_jax.objectives.binary_feedback import balanced_class_weights
from rlhf_jax.objectives.heron import hierarchical_compare, scaled_margins
from rlhf_jax.objectives.reward_strength import (
    adaptive_margin,
    flip_labels,
    preference_strength,
    soft_labels,
)
from rlhf_jax.train.config import ConfigError, Field
from rlhf_jax.train.loop import EpochPermutationSchedule
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps import make_reward_eval, make_reward_step, split_model
from rlhf_jax.train.steps.common import collect
from rlhf_jax.train.steps.reward import CONTRASTIVE_LOSSES, pair_scores

PAIR_LOSSES = ("bradley_terry", "plackett_luce", "strength", "heron", "binary_feedback")
HERON_FACTORS = (
    "harmlessness",
    "relevance",
    "topic",
    "specificity",
    "politeness",
    "rudeness",
    "length",
    "repetition",
)
SCHEMA = {
    "model_kind": Field(str, choices=("reward", "cost")),
    "reward_loss": Field(str, choices=PAIR_LOSSES),
    "margin": Field(float),
    "label_smoothing": Field(float, minimum=0.0, maximum=0.5),
    "sign_weight": Field(float, minimum=0.0),
    "contrastive_weight": Field(float, minimum=0.0),
    "contrastive_temperature": Field(float, minimum=1e-6),
    "dropout_rate": Field(float, minimum=0.0, maximum=0.9),
    "strength": {
        "ensemble": Field(str),
        "flip_threshold": Field(float),
        "soft_threshold": Field(float),
        "smoothing": Field(float, minimum=0.0, maximum=0.5),
        "margin_scale": Field(float, minimum=0.0),
    },
    "heron": {"factors": Field(str), "margin_scale": Field(float, minimum=0.0)},
    "feedback": {"love_threshold": Field(float), "balance_classes": Field(bool)},
}
LIST_KEYS = ("input_ids", "attention_mask")
SIDES = ("chosen", "rejected")


def as_lists(arrays: dict) -> dict:
    """Pairs as ranked lists of two, ``[N, 2, L]``, best first (for Plackett–Luce)."""
    return {k: np.stack([arrays[f"chosen_{k}"], arrays[f"rejected_{k}"]], 1) for k in LIST_KEYS}


def label_statistics(config: ml_collections.ConfigDict, arrays: dict) -> dict:
    """Bayes-optimal accuracy of the labels and the gold score's accuracy on the labels.

    The gold score's accuracy counts a tie (e.g. two safe responses, both of cost 0) as
    half right, the accuracy of a coin flip on a label that is itself a coin flip.
    """
    if config.model_kind == "reward":
        first, second = arrays["chosen_reward"], arrays["rejected_reward"]
        temperature = config.task.temperature
    else:
        first, second = arrays["rejected_cost"], arrays["chosen_cost"]
        temperature = config.task.cost_temperature
    return {
        "bayes_optimal_accuracy": bayes_optimal_accuracy(first, second, temperature),
        "gold_score_accuracy": float(np.mean((first > second) + 0.5 * (first == second))),
    }


def scores_of(graphdef, params, arrays: dict, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(chosen [N], rejected [N])`` scores of a scalar model on every pair of ``arrays``."""

    def forward(p, batch):
        chosen, rejected = pair_scores(graphdef, p, batch)
        return {"chosen": chosen, "rejected": rejected}

    data = {f"{side}_{k}": arrays[f"{side}_{k}"] for side in SIDES for k in LIST_KEYS}
    scores = collect(jax.jit(forward), (params,), data, batch_size=batch_size)
    return scores["chosen"], scores["rejected"]


def ensemble_scores(config, arrays: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(chosen [M, N], rejected [M, N])`` scores of every pair under the M ensemble runs."""
    workdirs = [w for w in config.strength.ensemble.split(",") if w]
    if not workdirs:
        raise ConfigError(
            "config.strength.ensemble must name reward-model workdirs (comma-separated) "
            "when config.reward_loss='strength'"
        )
    chosen, rejected = [], []
    for workdir in workdirs:
        graphdef, params, _ = load_scorer(workdir, "strength.ensemble", config.seed)
        scores = scores_of(graphdef, params, arrays, config.eval_batch_size)
        chosen.append(scores[0])
        rejected.append(scores[1])
    return np.stack(chosen), np.stack(rejected)


def swap_pairs(arrays: dict, flipped: np.ndarray) -> dict:
    """Exchange the chosen and rejected rows (and per-side fields) of the flipped pairs."""
    swapped = dict(arrays)
    for key in arrays:
        if key.startswith("chosen_"):
            other = "rejected_" + key[len("chosen_") :]
            rows = flipped.reshape(-1, *([1] * (arrays[key].ndim - 1)))
            swapped[key] = np.where(rows, arrays[other], arrays[key])
            swapped[other] = np.where(rows, arrays[key], arrays[other])
    return swapped


def strength_arrays(config, arrays: dict) -> tuple[dict, dict]:
    """Training pairs flipped, soft-labelled and given adaptive margins from the ensemble."""
    mean, _ = preference_strength(*map(jnp.asarray, ensemble_scores(config, arrays)))
    _, _, strength, flipped = flip_labels(
        mean, jnp.zeros_like(mean), mean, threshold=config.strength.flip_threshold
    )
    arrays = swap_pairs(arrays, np.asarray(flipped))
    arrays["label_probs"] = np.asarray(
        soft_labels(
            strength,
            threshold=config.strength.soft_threshold,
            smoothing=config.strength.smoothing,
        )
    )
    arrays["margins"] = np.asarray(adaptive_margin(strength, scale=config.strength.margin_scale))
    report = {
        "flipped_fraction": float(np.mean(flipped)),
        "soft_fraction": float(np.mean(arrays["label_probs"] < 1.0)),
        "mean_strength": float(np.mean(strength)),
    }
    return arrays, report


def factor_values(prompt: str, response: str, factors: tuple[str, ...]) -> list[float]:
    """The HERON factors of a reply, larger is better (cost, rudeness, repetition negated)."""
    features = reward_breakdown(prompt, response)
    signs = {"rudeness": -1.0, "repetition": -1.0}
    return [
        -gold_cost(prompt, response)
        if name == "harmlessness"
        else signs.get(name, 1.0) * getattr(features, name)
        for name in factors
    ]


def pair_factors(pairs: tuple[PreferencePair, ...], factors: tuple[str, ...]) -> np.ndarray:
    """``[N, 2, K]`` factors of each pair's (chosen, rejected) replies (helpfulness order)."""
    values = []
    for pair in pairs:
        replies = (pair.response_0, pair.response_1)
        chosen = replies[pair.better_response_id]
        rejected = replies[1 - pair.better_response_id]
        values.append([factor_values(pair.prompt, r, factors) for r in (chosen, rejected)])
    return np.asarray(values, np.float32)


def heron_factors(config) -> tuple[str, ...]:
    """The factor hierarchy of ``config.heron.factors``, most important first."""
    factors = tuple(f for f in config.heron.factors.split(",") if f)
    unknown = sorted(set(factors) - set(HERON_FACTORS))
    if unknown or not factors:
        raise ConfigError(
            f"config.heron.factors={config.heron.factors!r}: unknown factors {unknown}; "
            f"expected a comma-separated ordering of {HERON_FACTORS}"
        )
    return factors


def label_variants(config, task, train: dict, heldout: dict) -> tuple[dict, dict, dict]:
    """The per-pair fields of ``config.reward_loss`` on both splits, and a report."""
    loss, report = config.reward_loss, {}
    if loss == "strength":
        train, report = strength_arrays(config, train)
        heldout = {
            **heldout,
            "label_probs": np.ones(len(heldout["chosen_reward"]), np.float32),
            "margins": np.zeros(len(heldout["chosen_reward"]), np.float32),
        }
    elif loss == "heron":
        factors = heron_factors(config)
        train_factors = pair_factors(task.preference_train, factors)
        margins = scaled_margins(
            jnp.asarray(train_factors.reshape(-1, len(factors))), config.heron.margin_scale
        )
        labelled = []
        for arrays, pairs, values in (
            (train, task.preference_train, train_factors),
            (heldout, task.preference_heldout, None),
        ):
            values = pair_factors(pairs, factors) if values is None else values
            labels, _ = hierarchical_compare(values[:, 0], values[:, 1], margins)
            labelled.append({**arrays, "heron_labels": np.asarray(labels)})
        train, heldout = labelled
        report = {"labelled_fraction": float(np.mean(train["heron_labels"] != 0))}
    elif loss == "binary_feedback":
        rng = np.random.default_rng(config.seed)
        labelled = []
        for arrays in (train, heldout):
            arrays = dict(arrays)
            for side in SIDES:
                logits = (arrays[f"{side}_reward"] - config.feedback.love_threshold) / (
                    config.task.temperature
                )
                love = rng.random(logits.shape) < 1.0 / (1.0 + np.exp(-logits))
                arrays[f"{side}_feedback"] = love.astype(np.float32)
            labelled.append(arrays)
        train, heldout = labelled
        rate = float(np.mean([train[f"{side}_feedback"] for side in SIDES]))
        report = {"positive_rate": rate}
    return train, heldout, report


def class_weights(config, train: dict) -> dict:
    """Binary feedback's ``positive_weight`` and ``negative_weight`` (balanced or 1, 1)."""
    if config.reward_loss != "binary_feedback" or not config.feedback.balance_classes:
        return {}
    rate = float(np.mean([train[f"{side}_feedback"] for side in SIDES]))
    if not 0.0 < rate < 1.0:
        raise ConfigError(
            f"config.feedback.love_threshold={config.feedback.love_threshold} gives a "
            f"positive rate of {rate}; balancing needs both classes"
        )
    positive, negative = balanced_class_weights(rate)
    return {"positive_weight": float(positive), "negative_weight": float(negative)}


def dropout_options(config: ml_collections.ConfigDict, loss: str) -> dict:
    """The step's ``contrastive_weight``, ``contrastive_temperature`` and ``dropout_rate``.

    Raises:
      ConfigError: ``config.contrastive_weight > 0`` with ``config.dropout_rate == 0``
        (the two views would be identical) or with a loss outside ``CONTRASTIVE_LOSSES``.
    """
    if config.contrastive_weight > 0.0 and config.dropout_rate == 0.0:
        raise ConfigError(
            f"config.contrastive_weight={config.contrastive_weight} needs "
            "config.dropout_rate > 0: the two views of a pair differ only by dropout"
        )
    if config.contrastive_weight > 0.0 and loss not in CONTRASTIVE_LOSSES:
        raise ConfigError(
            f"config.contrastive_weight={config.contrastive_weight} applies to the losses "
            f"{CONTRASTIVE_LOSSES}, not {loss!r}"
        )
    return {
        "contrastive_weight": config.contrastive_weight,
        "contrastive_temperature": config.contrastive_temperature,
        "dropout_rate": config.dropout_rate,
    }


def gold_agreement(graphdef, params, heldout: dict, batch_size: int) -> float:
    """Fraction of held-out pairs (gold ties excluded) the score orders like the gold reward."""
    chosen, rejected = scores_of(graphdef, params, heldout, batch_size)
    gold = heldout["chosen_reward"] - heldout["rejected_reward"]
    model = chosen - rejected
    return float(np.mean(np.sign(model[gold != 0]) == np.sign(gold[gold != 0])))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train the scalar model, evaluate it on held-out pairs and export it."""
    common.validate(config, SCHEMA)
    loss = "cost" if config.model_kind == "cost" else config.reward_loss
    training_options = dropout_options(config, loss)
    tokenizer = common.build_tokenizer(config)
    task = common.build_task(config)
    label = "better" if config.model_kind == "reward" else "safer"
    train, heldout = (
        task_batches.task_preference_arrays(
            pairs, tokenizer, max_length=config.max_length, label=label
        )
        for pairs in (task.preference_train, task.preference_heldout)
    )
    report = {}
    if loss not in ("cost", "bradley_terry", "plackett_luce"):
        train, heldout, report = label_variants(config, task, train, heldout)
    if loss == "plackett_luce":
        train, heldout_data = as_lists(train), as_lists(heldout)
    else:
        heldout_data = heldout
    architecture = common.model_config(config, tokenizer)
    trunk = common.build_decoder(config, architecture)
    model = ScalarModel(architecture, rngs=nnx.Rngs(config.seed + 1), trunk=trunk)
    graphdef, params = split_model(model)
    tx = common.build_optimizer(config)
    hyper = {
        "loss": loss,
        "margin": config.margin,
        "label_smoothing": config.label_smoothing,
        "sign_weight": config.sign_weight,
        **class_weights(config, train),
    }
    step = make_reward_step(
        graphdef,
        tx,
        num_micro_batches=config.num_micro_batches,
        **hyper,
        **training_options,
    )
    evaluate = make_reward_eval(graphdef, batch_size=config.eval_batch_size, **hyper)
    schedule = EpochPermutationSchedule(train, config.batch_size, seed=config.seed)
    state = TrainState.create(params, tx, rng=config.seed)
    initial = evaluate(state, heldout_data)
    state, run_summary, history = common.train(step, state, schedule, config, workdir)
    final = evaluate(state, heldout_data)
    common.export_params(workdir, "scorer", state.params, architecture)
    summary = {
        "model_kind": config.model_kind,
        "loss": loss,
        "steps": run_summary.final_step,
        "train_loss_first": history[0]["loss"],
        "train_loss_last": history[-1]["loss"],
        "heldout_accuracy_initial": initial["accuracy"],
        "heldout_accuracy": final["accuracy"],
        "heldout_loss_initial": initial["loss"],
        "heldout_loss": final["loss"],
        **label_statistics(config, heldout),
        **{f"heldout_{k}": v for k, v in final.items() if k in ("sign_accuracy",)},
        **{f"train_{k}": v for k, v in report.items()},
        **{
            f"train_{k}": history[-1][k]
            for k in ("contrastive_loss", "contrastive_accuracy")
            if k in history[-1]
        },
    }
    if loss == "binary_feedback":
        summary["heldout_gold_agreement"] = gold_agreement(
            graphdef, state.params, heldout, config.eval_batch_size
        )
    return common.finish(workdir, f"{config.model_kind} model", summary)


if __name__ == "__main__":
    common.main(run)
