"""Supervised fine-tuning on the embedded task's demonstrations (loss on assistant tokens).

Builds the task, tokenizes the demonstrations with the chat template, trains a decoder with
the SFT step through the one loop driver, then reports the held-out NLL per token and a
few sampled replies with their gold reward and cost, and exports the policy for later runs
(``--config.init_from=<this workdir>``).

``python experiments/sft.py --config=experiments/configs/sft.py --workdir=runs/sft``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import ml_collections

from experiments import common
from rlhf_jax.data import task_batches
from rlhf_jax.train.config import Field
from rlhf_jax.train.loop import EpochPermutationSchedule
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps import make_sft_eval, make_sft_step, split_model

SCHEMA = {
    "normalisation": Field(str, choices=("token", "sequence")),
    "packing": Field(bool),
    "prompt_length": Field(int, minimum=1),
    "num_samples": Field(int, minimum=0),
    "sample_max_new_tokens": Field(int, minimum=1),
    "sample_temperature": Field(float, minimum=1e-6),
}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train, evaluate, sample and export; returns the printed summary."""
    common.validate(config, SCHEMA)
    tokenizer = common.build_tokenizer(config)
    task = common.build_task(config)
    dialogues = [[("human", e.prompt), ("assistant", e.response)] for e in task.sft_train]
    if config.packing:
        train = task_batches.packed_sft_arrays(dialogues, tokenizer, row_length=config.max_length)
    else:
        train = task_batches.sft_arrays(dialogues, tokenizer, max_length=config.max_length)
    heldout = task_batches.task_sft_arrays(
        task.sft_heldout, tokenizer, max_length=config.max_length
    )
    architecture = common.model_config(config, tokenizer)
    graphdef, params = split_model(common.build_decoder(config, architecture))
    tx = common.build_optimizer(config)
    step = make_sft_step(
        graphdef,
        tx,
        normalisation=config.normalisation,
        num_micro_batches=config.num_micro_batches,
    )
    evaluate = make_sft_eval(graphdef, batch_size=config.eval_batch_size)
    schedule = EpochPermutationSchedule(train, config.batch_size, seed=config.seed)
    state = TrainState.create(params, tx, rng=config.seed)
    initial = evaluate(state, heldout)
    state, run_summary, history = common.train(step, state, schedule, config, workdir)
    final = evaluate(state, heldout)
    common.export_params(workdir, "policy", state.params, architecture)
    prompts = [e.prompt for e in task.sft_heldout[: config.num_samples]]
    samples = common.sample_replies(
        graphdef,
        state.params,
        prompts,
        tokenizer,
        prompt_length=config.prompt_length,
        max_new_tokens=config.sample_max_new_tokens,
        temperature=config.sample_temperature,
        seed=config.seed,
    )
    summary = {
        "steps": run_summary.final_step,
        "train_loss_first": history[0]["loss"],
        "train_loss_last": history[-1]["loss"],
        "heldout_nll_initial": initial["nll_per_token"],
        "heldout_nll": final["nll_per_token"],
        "heldout_perplexity": final["perplexity"],
        **common.gold_scores(prompts, samples),
        "samples": [{"prompt": p, "reply": r} for p, r in zip(prompts, samples, strict=True)],
    }
    return common.finish(workdir, "SFT", summary)


if __name__ == "__main__":
    common.main(run)
