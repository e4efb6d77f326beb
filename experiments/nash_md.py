"""Nash-MD (or IPO-MD / online IPO) on the embedded task: self-play against a preference model.

The policy and the reference start from an SFT run (``--config.init_from``). Pairs of
replies are compared by one of two preference models (``config.preference``):

- ``"reward_model"``: ``σ(r(y) − r(y'))`` from a reward-model run (``--config.reward_from``),
  computed inside the jitted step, which runs under the loop driver;
- ``"oracle"``: the task's non-transitive oracle ``nontransitive_preference`` on the
  decoded replies (Munos et al., 2023, motivate Nash-MD by such cyclic preferences). The
  oracle is Python on strings, so each iteration is three explicit pieces: a jitted
  sampler, the oracle on the host, a jitted update. The loop driver only runs jittable
  steps, so this mode is driven here, step by step, writing the same metrics file
  (without checkpoints: such a run restarts from scratch).

Evaluations report the gold reward, cost and harm rate of held-out replies (and the
reward-model score when a reward model is given).

``python experiments/nash_md.py --config=experiments/configs/nash_md.py
--workdir=runs/nash --config.init_from=runs/sft --config.preference=oracle``
"""

import functools
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import ml_collections

from experiments import common
from experiments import ppo as rl
from rlhf_jax.data.embedded_task import nontransitive_preference
from rlhf_jax.train.config import ConfigError, Field
from rlhf_jax.train.metrics import MetricsWriter
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps.common import split_model
from rlhf_jax.train.steps.nash_md import (
    NASH_LOSSES,
    NashMDConfig,
    NashMDModels,
    init_nash_md_extra,
    make_nash_md_generate,
    make_nash_md_step,
    make_nash_md_update,
    oracle_preferences,
)

SCHEMA = {
    **rl.ROLLOUT_SCHEMA,
    "preference": Field(str, choices=("reward_model", "oracle")),
    "loss": Field(str, choices=NASH_LOSSES),
    "mixture_beta": Field(float, minimum=0.0, maximum=1.0),
    "tau": Field(float, minimum=1e-9),
    "oracle_temperature": Field(float, minimum=1e-9),
    "oracle_cycle_strength": Field(float, minimum=0.0),
}


def train_with_oracle(models, tx, nash_config, state, schedule, config, workdir, evaluate, label):
    """Sample (jitted), label the pairs on the host, update (jitted), step by step.

    ``label(pairs, prompt_index) -> preferences [B]`` runs in Python between the two
    jitted functions. Returns ``(state, history, evaluations)``; metrics go to
    ``workdir/metrics.jsonl``.
    """
    generate_pairs = jax.jit(make_nash_md_generate(models, nash_config))
    update = jax.jit(make_nash_md_update(models, tx, nash_config), donate_argnums=0)
    writer = MetricsWriter(workdir, total_steps=config.num_steps, progress=False)
    evaluations, history = [{"step": 0, **evaluate(state.params)}], []
    for step in range(config.num_steps):
        batch = schedule.batch_for_step(step)
        sample_key, update_key = jax.random.split(jax.random.fold_in(state.rng, step))
        pairs = generate_pairs(state, batch, sample_key)
        preferences = label(pairs, batch["prompt_index"])
        state, metrics = update(state, pairs, preferences, update_key)
        state = state.replace(step=state.step + 1)
        writer.record(step + 1, metrics)
        if (step + 1) % config.log_every == 0 or step + 1 == config.num_steps:
            history.extend(writer.flush())
        if (step + 1) % config.eval_every == 0 or step + 1 == config.num_steps:
            evaluations.append({"step": step + 1, **evaluate(state.params)})
    writer.close()
    return state, history, evaluations


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train with the configured Nash-MD-family loss, evaluate, export; returns the summary."""
    rl.validate_rollout(config, SCHEMA)
    if config.preference == "reward_model" and not config.reward_from:
        raise ConfigError("config.reward_from is required when config.preference='reward_model'")
    tokenizer = common.build_tokenizer(config)
    task = common.build_task(config)
    architecture = common.model_config(config, tokenizer)
    policy_graphdef, policy_params = split_model(common.build_decoder(config, architecture))
    scorers, reward_graphdef, reward_params = {}, None, None
    if config.reward_from:
        reward_graphdef, reward_params, _ = rl.load_scorer(
            config.reward_from, "reward_from", config.seed
        )
        scorers["reward"] = (reward_graphdef, reward_params)
    nash_config = NashMDConfig(
        sampling=rl.sampling_config(config, tokenizer),
        loss=config.loss,
        mixture_beta=config.mixture_beta,
        tau=config.tau,
        num_micro_batches=config.num_micro_batches,
    )
    use_rm = config.preference == "reward_model"
    models = NashMDModels(policy_graphdef, reward_graphdef if use_rm else None)
    extra = init_nash_md_extra(
        reference_params=rl.copy_tree(policy_params),
        reward_params=reward_params if use_rm else None,
    )
    tx = common.build_optimizer(config)
    state = TrainState.create(policy_params, tx, rng=config.seed, extra=extra)
    evaluate = rl.make_evaluator(config, tokenizer, task, policy_graphdef, scorers)
    schedule = rl.prompt_schedule(config, tokenizer, task)
    if use_rm:
        state, run_summary, history, evaluations = rl.train_with_evaluations(
            make_nash_md_step(models, tx, nash_config),
            state,
            schedule,
            config,
            workdir,
            evaluate,
            lambda s: s.params,
        )
        steps = run_summary.final_step
    else:
        oracle = functools.partial(
            nontransitive_preference,
            temperature=config.oracle_temperature,
            cycle_strength=config.oracle_cycle_strength,
        )
        texts = [p.text for p in task.train_prompts]

        def label(pairs, prompt_index):
            prompts = [texts[i] for i in prompt_index]
            return oracle_preferences(pairs, prompts, tokenizer.decode, oracle)

        state, history, evaluations = train_with_oracle(
            models, tx, nash_config, state, schedule, config, workdir, evaluate, label
        )
        steps = int(state.step)
    common.export_params(workdir, "policy", state.params, architecture)
    summary = {"preference": config.preference, "loss": config.loss, "steps": steps}
    for key in ("preference", "kl", "response_length"):
        summary[f"train_{key}_first"] = history[0][key]
        summary[f"train_{key}_last"] = history[-1][key]
    for name, value in evaluations[-1].items():
        if name.startswith("eval_") and name != "eval_sample":
            summary[f"{name}_initial"], summary[name] = evaluations[0][name], value
    summary["evaluations"] = evaluations
    return common.finish(workdir, f"Nash-MD ({config.loss}, {config.preference})", summary)


if __name__ == "__main__":
    common.main(run)
