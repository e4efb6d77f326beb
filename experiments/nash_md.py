"""Nash-MD (or IPO-MD / online IPO) on the embedded task: self-play against a preference model.

The policy and the reference start from an SFT run (``--config.init_from``). Pairs of
replies are compared by one of three preference models (``config.preference``):

- ``"reward_model"``: ``σ(r(y) − r(y'))`` from a reward-model run (``--config.reward_from``),
  computed inside the jitted step, which runs under the loop driver;
- ``"oracle"``: the task's non-transitive oracle ``nontransitive_preference`` on the
  decoded replies (Munos et al., 2023, motivate Nash-MD by such cyclic preferences). The
  oracle is Python on strings, so the step is a host step (:func:`oracle_step`): a
  jitted sampler, the oracle on the host, a jitted update, run by the loop driver with
  ``jit_step=False``;
- ``"judge"``: an LM judge, ``P(a ≻ b)`` read from the verdict-token probabilities of
  the policy exported by ``--config.judge_from`` under a judging prompt, symmetrised
  over both presentation orders (:func:`rlhf_jax.train.steps.judge.make_lm_judge`,
  generative reward models in the style of RM-R1); a host step like the oracle.

All modes train through the same path (``ppo.train_with_evaluations``): the same
checkpoints, exact resume from the newest one, metrics and evaluations. Evaluations
report the gold reward, cost and harm rate of held-out replies, the KL to the reference
(``eval_kl``) and the reward-model score when a reward model is given.

``python experiments/nash_md.py --config=experiments/configs/nash_md.py
--workdir=runs/nash --config.init_from=runs/sft --config.preference=oracle``
"""

import functools
import pathlib
import sys
from collections.abc import Callable, Sequence

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import ml_collections
import numpy as np
import optax

from experiments import common
from experiments import ppo as rl
from rlhf_jax.data.embedded_task import nontransitive_preference
from rlhf_jax.train.config import ConfigError, Field
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps.common import StepFn, split_model
from rlhf_jax.train.steps.judge import make_lm_judge
from rlhf_jax.train.steps.nash_md import (
    NASH_LOSSES,
    NashMDConfig,
    NashMDModels,
    Oracle,
    init_nash_md_extra,
    make_nash_md_generate,
    make_nash_md_step,
    make_nash_md_update,
    oracle_preferences,
)

SCHEMA = {
    **rl.ROLLOUT_SCHEMA,
    "preference": Field(str, choices=("reward_model", "oracle", "judge")),
    "judge_from": Field(str),
    "loss": Field(str, choices=NASH_LOSSES),
    "mixture_beta": Field(float, minimum=0.0, maximum=1.0),
    "tau": Field(float, minimum=1e-9),
    "oracle_temperature": Field(float, minimum=1e-9),
    "oracle_cycle_strength": Field(float, minimum=0.0),
}


def oracle_step(
    models: NashMDModels,
    tx: optax.GradientTransformation,
    nash_config: NashMDConfig,
    prompt_texts: Sequence[str],
    decode: Callable[[Sequence[int]], str],
    oracle: Oracle,
) -> StepFn:
    """The host step of the oracle mode: jitted sampling, oracle on the host, jitted update.

    The pairs of :func:`~rlhf_jax.train.steps.nash_md.make_nash_md_generate` are decoded
    and labelled in Python by :func:`~rlhf_jax.train.steps.nash_md.oracle_preferences`
    (``prompt_texts[i]`` is the text of the batch's ``prompt_index`` ``i``), then
    :func:`~rlhf_jax.train.steps.nash_md.make_nash_md_update` takes the gradient step.
    The step's key is split as in :func:`~rlhf_jax.train.steps.nash_md.make_nash_md_step`
    (sampling, update). Run it with ``loop.run(..., jit_step=False)``.
    """
    generate_pairs = jax.jit(make_nash_md_generate(models, nash_config))
    update = jax.jit(make_nash_md_update(models, tx, nash_config), donate_argnums=0)

    def step(state: TrainState, prompts: dict, rng: jax.Array):
        sample_key, update_key = jax.random.split(rng)
        pairs = generate_pairs(state, prompts, sample_key)
        texts = [prompt_texts[i] for i in np.asarray(prompts["prompt_index"])]
        preferences = oracle_preferences(pairs, texts, decode, oracle)
        return update(state, pairs, preferences, update_key)

    return step


def load_judge(config: ml_collections.ConfigDict, tokenizer) -> Oracle:
    """The LM judge of the policy exported by the ``config.judge_from`` run.

    Its judging prompts are left-padded to the judge's ``max_position_embeddings``
    (:func:`rlhf_jax.train.steps.judge.make_lm_judge`).
    """
    source = config.copy_and_resolve_references()
    source.init_from = config.judge_from
    architecture = common.model_config(source, tokenizer)
    graphdef, params = split_model(common.build_decoder(source, architecture))
    return make_lm_judge(
        graphdef, params, tokenizer, max_length=architecture.max_position_embeddings
    )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train with the configured Nash-MD-family loss, evaluate, export; returns the summary."""
    rl.validate_rollout(config, SCHEMA)
    if config.preference == "reward_model" and not config.reward_from:
        raise ConfigError("config.reward_from is required when config.preference='reward_model'")
    if config.preference == "judge" and not config.judge_from:
        raise ConfigError("config.judge_from is required when config.preference='judge'")
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
    evaluate = rl.make_evaluator(
        config,
        tokenizer,
        task,
        policy_graphdef,
        scorers,
        reference_params=extra["reference_params"],
    )
    if use_rm:
        step = make_nash_md_step(models, tx, nash_config)
    else:
        if config.preference == "judge":
            oracle = load_judge(config, tokenizer)
        else:
            oracle = functools.partial(
                nontransitive_preference,
                temperature=config.oracle_temperature,
                cycle_strength=config.oracle_cycle_strength,
            )
        texts = [p.text for p in task.train_prompts]
        step = oracle_step(models, tx, nash_config, texts, tokenizer.decode, oracle)
    state, run_summary, history, evaluations = rl.train_with_evaluations(
        step,
        state,
        rl.prompt_schedule(config, tokenizer, task),
        config,
        workdir,
        evaluate,
        lambda s: s.params,
        jit_step=use_rm,
    )
    common.export_params(workdir, "policy", state.params, architecture)
    summary = {
        "preference": config.preference,
        "loss": config.loss,
        **rl.training_summary(
            run_summary, history, evaluations, ("preference", "kl", "response_length")
        ),
    }
    return common.finish(workdir, f"Nash-MD ({config.loss}, {config.preference})", summary)


if __name__ == "__main__":
    common.main(run)
