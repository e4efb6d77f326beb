"""Direct preference optimisation (DPO family) on the embedded task's helpfulness pairs.

The policy starts from ``init_from``'s SFT policy (or a fresh decoder), which is also the
frozen reference. ``reference="in_step"`` keeps the reference parameters in the state and
evaluates them in every step; ``"precomputed"`` computes the reference log-probs of the
whole data set once before training. The summary reports the held-out implicit-reward
accuracy and margins, ``β log π/π_ref`` of the chosen and rejected responses.

``python experiments/dpo.py --config=experiments/configs/dpo.py --workdir=runs/dpo
--config.init_from=runs/sft``
"""

import inspect
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import ml_collections

from experiments import common
from rlhf_jax.data import task_batches
from rlhf_jax.objectives.pairwise import PAIRWISE_LOSSES
from rlhf_jax.train.config import ConfigError, Field
from rlhf_jax.train.loop import EpochPermutationSchedule
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps import (
    initial_dpo_extra,
    make_dpo_eval,
    make_dpo_step,
    precompute_reference_logps,
    split_model,
)

SCHEMA = {
    "loss_name": Field(str, choices=tuple(sorted(PAIRWISE_LOSSES))),
    "reference": Field(str, choices=("in_step", "precomputed")),
}
SHARED_ARGUMENTS = ("chosen_lengths", "rejected_lengths", "reduction")


def validate_hyper(config: ml_collections.ConfigDict) -> dict:
    """``config.hyper`` as keywords of the chosen loss; an unknown key is named in the error."""
    parameters = inspect.signature(PAIRWISE_LOSSES[config.loss_name]).parameters
    known = [
        name
        for name, p in parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in SHARED_ARGUMENTS
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


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train the policy with the named pairwise loss, evaluate it and export it."""
    common.validate(config, {**SCHEMA, "hyper": Field(ml_collections.ConfigDict)})
    hyper = validate_hyper(config)
    tokenizer = common.build_tokenizer(config)
    task = common.build_task(config)
    train, heldout = (
        task_batches.task_preference_arrays(pairs, tokenizer, max_length=config.max_length)
        for pairs in (task.preference_train, task.preference_heldout)
    )
    architecture = common.model_config(config, tokenizer)
    graphdef, params = split_model(common.build_decoder(config, architecture))
    reference_params = jax.tree.map(lambda x: x.copy(), params)
    if config.reference == "precomputed":
        train, heldout = (
            precompute_reference_logps(
                graphdef, reference_params, arrays, batch_size=config.eval_batch_size
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
        "steps": run_summary.final_step,
        "train_loss_first": history[0]["loss"],
        "train_loss_last": history[-1]["loss"],
        "train_reward_accuracy_last": history[-1]["reward_accuracy"],
        **{f"heldout_{k}": v for k, v in final.items() if k != "denominator"},
    }
    return common.finish(workdir, f"{config.loss_name} policy", summary)


if __name__ == "__main__":
    common.main(run)
