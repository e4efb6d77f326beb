"""HC-RLHF on the embedded task: high-confidence safe RLHF with a held-out safety test.

Chittepu et al. (2025), "Reinforcement Learning from Human Feedback with High-Confidence
Safety Constraints". Two stages on disjoint prompts:

1. Candidate selection: the Safe-RLHF run of ``safe_rlhf.py`` (policy and reference from
   ``init_from``, reward and cost models from ``reward_from`` and ``cost_from``) whose
   dual step uses the inflated upper confidence bound ``U_cand`` of the rollout's cost-
   model scores in place of their mean, and whose cost critic learns the per-sample
   costs of that bound's gradient (``cost_bound="pessimistic"`` of
   :mod:`rlhf_jax.train.steps.safe_rlhf`; δ = ``bound_delta``, κ_c = ``candidate_coef``,
   κ_s = ``safety_coef``, n_s = ``num_safety_prompts``).
2. Safety test: the candidate answers the ``num_safety_prompts`` held-out prompts that
   follow the evaluation prompts; the cost model scores the replies and the one-sided
   Student-t bound ``ĉ_s + t_{1−δ, n_s−1} s_s/√n_s`` is compared with
   ``cost_threshold``. The candidate is exported as ``policy/`` only when the bound is
   below the threshold; otherwise the verdict is "No Solution Found" (the candidate is
   kept under ``candidate/`` either way).

The summary reports the verdict, the safety bound, the last candidate bound and the gold
cost and harm rate of the safety replies.

``python experiments/hc_rlhf.py --config=experiments/configs/hc_rlhf.py --workdir=runs/hc
--config.init_from=runs/sft --config.reward_from=runs/rm --config.cost_from=runs/cm``
"""

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import ml_collections
import numpy as np

from experiments import common
from experiments import ppo as rl
from experiments import safe_rlhf as safe
from rlhf_jax.data import task_batches
from rlhf_jax.data.embedded_task import score_responses
from rlhf_jax.objectives.hc_rlhf import PASS, safety_test, safety_verdict
from rlhf_jax.sampling import sample
from rlhf_jax.train.config import ConfigError, Field
from rlhf_jax.train.steps.common import split_model

SCHEMA = {
    **safe.SCHEMA,
    "bound_delta": Field(float, minimum=1e-6, maximum=0.499),
    "candidate_coef": Field(float, minimum=0.0),
    "safety_coef": Field(float, minimum=0.0),
    "num_safety_prompts": Field(int, minimum=2),
}
SAFETY_SEED_OFFSET = 10_000  # sampler keys of the safety test, apart from the evaluations'


def safety_prompts(config: ml_collections.ConfigDict, task) -> list[str]:
    """The held-out prompts after the evaluation prompts, ``num_safety_prompts`` of them.

    Raises:
      ConfigError: when the task has too few held-out prompts.
    """
    start = config.num_eval_prompts
    texts = [p.text for p in task.heldout_prompts[start : start + config.num_safety_prompts]]
    if len(texts) < config.num_safety_prompts:
        raise ConfigError(
            f"config.num_safety_prompts={config.num_safety_prompts}: the task has "
            f"{len(task.heldout_prompts)} held-out prompts, of which the first "
            f"config.num_eval_prompts={start} are for evaluation; raise "
            "config.task.num_heldout_prompts"
        )
    return texts


def sample_and_cost(config, tokenizer, texts, policy, cost_model):
    """Replies of ``policy = (graphdef, params)`` to ``texts`` and their cost-model scores."""
    arrays = task_batches.task_prompt_arrays(texts, tokenizer, max_length=config.prompt_length)
    arrays = {k: arrays[k] for k in ("input_ids", "attention_mask")}
    sampling = rl.sampling_config(config, tokenizer)
    replies, costs = [], []
    batches = task_batches.sequential_batches(arrays, batch_size=config.eval_batch_size)
    for index, (batch, valid) in enumerate(batches):
        key = jax.random.fold_in(jax.random.key(config.seed), SAFETY_SEED_OFFSET + index)
        output = sample(*policy, batch["input_ids"], batch["attention_mask"], key, config=sampling)
        scores = rl.score_sequences(*cost_model, output.tokens, output.attention_mask)
        tokens, mask, scores = jax.device_get((output.tokens, output.response_mask, scores))
        for row, keep in zip(tokens[:valid], mask[:valid].astype(bool), strict=True):
            replies.append(tokenizer.decode(row[keep]))
        costs.extend(np.asarray(scores)[:valid].tolist())
    return replies, np.asarray(costs, np.float32)


def run_safety_test(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Stage 2 on the candidate exported in ``workdir/candidate``; returns its summary entries.

    Exports the candidate as ``workdir/policy`` when it passes. Callable on its own to
    test a finished candidate at another ``cost_threshold`` or ``bound_delta``.
    """
    tokenizer = common.build_tokenizer(config)
    task = common.build_task(config)
    texts = safety_prompts(config, task)
    architecture = common.model_config(config, tokenizer)
    policy_graphdef, like = split_model(common.build_decoder(config, architecture))
    candidate = common.import_params(workdir, "candidate", like)
    cost_graphdef, cost_params, _ = rl.load_scorer(config.cost_from, "cost_from", config.seed)
    replies, costs = sample_and_cost(
        config, tokenizer, texts, (policy_graphdef, candidate), (cost_graphdef, cost_params)
    )
    passed, bound = safety_test(
        jax.numpy.asarray(costs), threshold=config.cost_threshold, delta=config.bound_delta
    )
    verdict = safety_verdict(passed)
    if bool(passed):
        common.export_params(workdir, "policy", candidate, architecture)
    gold = score_responses(texts, replies)
    return {
        "verdict": verdict,
        "safety_bound": float(bound),
        "safety_threshold": config.cost_threshold,
        "safety_delta": config.bound_delta,
        "safety_cost_mean": float(np.mean(costs)),
        "safety_prompts": len(texts),
        **{f"safety_{k}": v for k, v in gold.items()},
    }


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Select a candidate under the pessimistic bound, safety-test it; returns the summary."""
    rl.validate_rollout(config, SCHEMA)
    safety_prompts(config, common.build_task(config))  # fail before training if too few
    summary = safe.train(
        config,
        workdir,
        export_as="candidate",
        cost_bound="pessimistic",
        bound_delta=config.bound_delta,
        safety_size=config.num_safety_prompts,
        candidate_coef=config.candidate_coef,
        safety_coef=config.safety_coef,
    )
    summary = {**run_safety_test(config, workdir), **summary}
    summary["policy"] = os.path.join(workdir, "policy") if summary["verdict"] == PASS else None
    return common.finish(workdir, "HC-RLHF", summary)


if __name__ == "__main__":
    common.main(run)
