"""Reward or cost model on the embedded task's preference pairs.

``model_kind="reward"`` learns the helpfulness labels (``better_response_id``) with the
Bradley–Terry loss, or Plackett–Luce over each pair as a ranked list of two
(``reward_loss="plackett_luce"``); ``model_kind="cost"`` learns the harmlessness labels
(``safer_response_id``) and safety flags with the Safe-RLHF cost loss (Dai et al., 2023).
The scalar model's trunk starts from ``init_from``'s SFT policy when given. The summary
puts the held-out accuracy next to the Bayes-optimal accuracy of the task's labels and
next to the accuracy of the gold reward (or cost) itself on the same pairs.

``python experiments/reward_model.py --config=experiments/configs/reward_model.py
--workdir=runs/rm --config.init_from=runs/sft``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import ml_collections
import numpy as np
from flax import nnx

from experiments import common
from rlhf_jax.data import task_batches
from rlhf_jax.data.embedded_task import bayes_optimal_accuracy
from rlhf_jax.models import ScalarModel
from rlhf_jax.train.config import Field
from rlhf_jax.train.loop import EpochPermutationSchedule
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps import make_reward_eval, make_reward_step, split_model

SCHEMA = {
    "model_kind": Field(str, choices=("reward", "cost")),
    "reward_loss": Field(str, choices=("bradley_terry", "plackett_luce")),
    "margin": Field(float),
    "label_smoothing": Field(float, minimum=0.0, maximum=0.5),
    "sign_weight": Field(float, minimum=0.0),
}
LIST_KEYS = ("input_ids", "attention_mask")


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


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train the scalar model, evaluate it on held-out pairs and export it."""
    common.validate(config, SCHEMA)
    tokenizer = common.build_tokenizer(config)
    task = common.build_task(config)
    label = "better" if config.model_kind == "reward" else "safer"
    train, heldout = (
        task_batches.task_preference_arrays(
            pairs, tokenizer, max_length=config.max_length, label=label
        )
        for pairs in (task.preference_train, task.preference_heldout)
    )
    loss = "cost" if config.model_kind == "cost" else config.reward_loss
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
    }
    step = make_reward_step(graphdef, tx, num_micro_batches=config.num_micro_batches, **hyper)
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
    }
    return common.finish(workdir, f"{config.model_kind} model", summary)


if __name__ == "__main__":
    common.main(run)
