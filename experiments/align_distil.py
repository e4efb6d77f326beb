"""AlignDistil on the embedded task: distil an SFT policy toward a DPO-and-reference teacher.

The policy and the frozen reference start from an SFT run (``--config.init_from``); the
DPO model is a DPO-family run from that SFT policy (``--config.dpo_from``). Every step
samples one reply per training prompt from the current policy and takes one step of the
token-level distillation toward ``π_T ∝ π_ref^{1−c} π_dpo^c`` (Zhang et al., 2025), with
``c = coefficient`` (β_dpo/β). Every ``eval_every`` steps the policy answers held-out
prompts, scored by the gold reward, cost and harm rate.

``python experiments/align_distil.py --config=experiments/configs/align_distil.py
--workdir=runs/align_distil --config.init_from=runs/sft --config.dpo_from=runs/dpo``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import ml_collections

from experiments import common
from experiments import ppo as rl
from rlhf_jax.train.config import ConfigError, Field
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps.align_distil import (
    AlignDistilConfig,
    init_align_distil_extra,
    make_align_distil_step,
)
from rlhf_jax.train.steps.common import split_model

SCHEMA = {
    **{k: v for k, v in rl.ROLLOUT_SCHEMA.items() if k != "reward_from"},
    "dpo_from": Field(str),
    "coefficient": Field(float, minimum=0.0),
    "direction": Field(str, choices=("reverse", "forward")),
}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Distil the policy toward the teacher, evaluate along the way, export; returns the summary."""
    rl.validate_rollout(config, SCHEMA)
    if not config.dpo_from:
        raise ConfigError("config.dpo_from must name the workdir of a DPO run")
    tokenizer = common.build_tokenizer(config)
    task = common.build_task(config)
    architecture = common.model_config(config, tokenizer)
    graphdef, params = split_model(common.build_decoder(config, architecture))
    dpo_params = common.import_params(config.dpo_from, "policy", params)
    extra = init_align_distil_extra(reference_params=rl.copy_tree(params), dpo_params=dpo_params)
    distil_config = AlignDistilConfig(
        sampling=rl.sampling_config(config, tokenizer),
        coefficient=config.coefficient,
        direction=config.direction,
    )
    tx = common.build_optimizer(config)
    state = TrainState.create(params, tx, rng=config.seed, extra=extra)
    evaluate = rl.make_evaluator(config, tokenizer, task, graphdef, {})
    state, run_summary, history, evaluations = rl.train_with_evaluations(
        make_align_distil_step(graphdef, tx, distil_config),
        state,
        rl.prompt_schedule(config, tokenizer, task),
        config,
        workdir,
        evaluate,
        lambda s: s.params,
    )
    common.export_params(workdir, "policy", state.params, architecture)
    keys = ("loss", "teacher_agreement", "response_length")
    summary = {"coefficient": config.coefficient, "direction": config.direction}
    summary.update(rl.training_summary(run_summary, history, evaluations, keys))
    return common.finish(workdir, "AlignDistil", summary)


if __name__ == "__main__":
    common.main(run)
