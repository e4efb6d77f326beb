"""Balanced Actor Initialization: merge exported policies and evaluate the merge on the task.

Zheng et al. (2025), "Balanced Actor Initialization" (BAI), a two-stage weighted merge
(:func:`rlhf_jax.models.merging.balanced_actor_initialization`):

    θ_1   = α θ_instruct + (1 − α) θ_reasoning,      θ_BAI = β θ_1 + (1 − β) θ_pretrained.

On the embedded task the pretrained model is the SFT policy both others start from
(``pretrained_from``), the instruction-following model an aligned run (e.g. DPO,
``instruct_from``) and the second fine-tuned model any other run from the same SFT
policy (``reasoning_from``; empty: the instruct run again, so the merge is the
interpolation ``β θ_instruct + (1 − β) θ_pretrained``). Every input and the merge answer
the first ``num_eval_prompts`` held-out prompts (same sampling seed); the summary reports
the gold reward, cost and harm rate of each (``common.gold_scores``) and the merge is
exported as ``policy/`` for later runs.

``python experiments/merge.py --config=experiments/configs/merge.py --workdir=runs/bai
--config.pretrained_from=runs/sft --config.instruct_from=runs/dpo
--config.reasoning_from=runs/raft``
"""

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import ml_collections

from experiments import common
from rlhf_jax.models.merging import balanced_actor_initialization
from rlhf_jax.train.config import ConfigError, Field
from rlhf_jax.train.steps.common import split_model

SCHEMA = {
    "pretrained_from": Field(str),
    "instruct_from": Field(str),
    "reasoning_from": Field(str),
    "instruct_weight": Field(float, minimum=0.0, maximum=1.0),
    "merged_weight": Field(float, minimum=0.0, maximum=1.0),
    "prompt_length": Field(int, minimum=1),
    "num_eval_prompts": Field(int, minimum=1),
    "sample_max_new_tokens": Field(int, minimum=1),
    "sample_temperature": Field(float, minimum=1e-6),
}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Merge the policies, evaluate every input and the merge, export the merge."""
    common.validate(config, SCHEMA)
    for key in ("pretrained_from", "instruct_from"):
        if not config[key]:
            raise ConfigError(f"config.{key} must name the workdir of an exported policy")
    tokenizer = common.build_tokenizer(config)
    task = common.build_task(config)
    source = config.copy_and_resolve_references()
    source.init_from = config.pretrained_from
    architecture = common.model_config(source, tokenizer)
    graphdef, pretrained = split_model(common.build_decoder(source, architecture))
    instruct = common.import_params(config.instruct_from, "policy", pretrained)
    reasoning = (
        common.import_params(config.reasoning_from, "policy", pretrained)
        if config.reasoning_from
        else instruct
    )
    merged = balanced_actor_initialization(
        instruct,
        reasoning,
        pretrained,
        instruct_weight=config.instruct_weight,
        merged_weight=config.merged_weight,
    )
    os.makedirs(workdir, exist_ok=True)
    common.export_params(workdir, "policy", merged, architecture)
    prompts = [p.text for p in task.heldout_prompts[: config.num_eval_prompts]]
    policies = {"pretrained": pretrained, "instruct": instruct, "merged": merged}
    if config.reasoning_from:
        policies["reasoning"] = reasoning
    summary = {"instruct_weight": config.instruct_weight, "merged_weight": config.merged_weight}
    for name, params in policies.items():
        replies = common.sample_replies(
            graphdef,
            params,
            prompts,
            tokenizer,
            prompt_length=config.prompt_length,
            max_new_tokens=config.sample_max_new_tokens,
            temperature=config.sample_temperature,
            seed=config.seed,
        )
        summary.update({f"{name}_{k}": v for k, v in common.gold_scores(prompts, replies).items()})
    return common.finish(workdir, "BAI merge", summary)


if __name__ == "__main__":
    common.main(run)
