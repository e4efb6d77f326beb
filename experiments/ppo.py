"""PPO on the embedded task: an SFT policy optimised against a trained reward model.

The policy and the frozen reference start from an SFT run (``--config.init_from``), the
reward model from a reward-model run (``--config.reward_from``); the critic is a value
head on the policy's trunk (``shared_critic=True``) or a copy of the reward model
(Ouyang et al., 2022, §3.5, initialise the value function from the reward model). Every
``eval_every`` steps the policy answers held-out prompts: the replies are decoded and
scored by the gold reward and cost of the task (``embedded_task.score_responses``) and by
the reward model, and their log-probabilities under the policy and the reference give
the KL to the reference (:func:`make_evaluator`). The pieces here (scorer loading,
prompt schedule, evaluation, training between evaluations) are shared with
``safe_rlhf.py`` and ``nash_md.py``.

``python experiments/ppo.py --config=experiments/configs/ppo.py --workdir=runs/ppo
--config.init_from=runs/sft --config.reward_from=runs/rm``
"""

import dataclasses
import functools
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from experiments import common
from rlhf_jax.data import task_batches
from rlhf_jax.data.embedded_task import score_responses
from rlhf_jax.models import ModelConfig, PolicyWithValueHead, ScalarModel
from rlhf_jax.models.logprobs import sequence_logprobs
from rlhf_jax.sampling import SamplingConfig, sample
from rlhf_jax.train import loop
from rlhf_jax.train.config import ConfigError, Field
from rlhf_jax.train.metrics import JSONL_NAME, read_jsonl
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps.common import make_optimizer, split_model
from rlhf_jax.train.steps.ppo import PPOConfig, PPOModels, init_ppo_extra, make_ppo_step
from rlhf_jax.train.steps.rollout import KL_MODES, PPOUpdateConfig, sequence_scores

ROLLOUT_SCHEMA = {
    "reward_from": Field(str),
    "prompt_length": Field(int, minimum=1),
    "max_new_tokens": Field(int, minimum=1),
    "temperature": Field(float, minimum=1e-6),
    "eval_every": Field(int, minimum=1),
    "num_eval_prompts": Field(int, minimum=1),
}
PPO_SCHEMA = {
    "kl_coef": Field(float, minimum=0.0),
    "kl_target": Field(float, minimum=0.0),
    "kl_horizon": Field(float, minimum=1.0),
    "kl_mode": Field(str, choices=KL_MODES),
    "kl_estimator": Field(str, choices=("k1", "k2", "k3")),
    "epochs": Field(int, minimum=1),
    "num_minibatches": Field(int, minimum=1),
    "clip_eps": Field(float, minimum=0.0),
    "value_clip_eps": Field(float, minimum=0.0),
    "value_coef": Field(float, minimum=0.0),
    "entropy_coef": Field(float, minimum=0.0),
    "gamma": Field(float, minimum=0.0, maximum=1.0),
    "lam": Field(float, minimum=0.0, maximum=1.0),
    "whiten_advantages": Field(bool),
}
SCHEMA = {**ROLLOUT_SCHEMA, **PPO_SCHEMA, "shared_critic": Field(bool)}


def validate_rollout(config: ml_collections.ConfigDict, schema: dict) -> None:
    """:func:`common.validate` plus the rollout's length and minibatch constraints."""
    common.validate(config, schema)
    if config.prompt_length + config.max_new_tokens > config.max_length:
        raise ConfigError(
            f"config.prompt_length + config.max_new_tokens = {config.prompt_length} + "
            f"{config.max_new_tokens} exceeds config.max_length={config.max_length}"
        )
    minibatches = config.get("num_minibatches", 1)
    if config.batch_size % (minibatches * config.num_micro_batches):
        raise ConfigError(
            f"config.batch_size={config.batch_size} must be divisible by "
            f"config.num_minibatches × config.num_micro_batches = {minibatches} × "
            f"{config.num_micro_batches}"
        )


def sampling_config(config: ml_collections.ConfigDict, tokenizer) -> SamplingConfig:
    """The rollout sampler: ``max_new_tokens`` at ``temperature``, stopping at EOS."""
    return SamplingConfig(
        max_new_tokens=config.max_new_tokens,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        temperature=config.temperature,
    )


def update_config(config: ml_collections.ConfigDict) -> PPOUpdateConfig:
    """The PPO update of ``config`` (``value_clip_eps = 0`` means unclipped)."""
    return PPOUpdateConfig(
        epochs=config.epochs,
        num_minibatches=config.num_minibatches,
        num_micro_batches=config.num_micro_batches,
        clip_eps=config.clip_eps,
        value_clip_eps=config.value_clip_eps or None,
        value_coef=config.value_coef,
        entropy_coef=config.entropy_coef,
        kl_mode=config.kl_mode,
        kl_estimator=config.kl_estimator,
        gamma=config.gamma,
        lam=config.lam,
        whiten_advantages=config.whiten_advantages,
    )


def build_rl_optimizer(config: ml_collections.ConfigDict):
    """The shared optimiser, its schedule counted in gradient updates.

    An RL iteration takes ``epochs × num_minibatches`` updates, so the warm-up and cosine
    decay of :func:`rlhf_jax.train.steps.common.make_optimizer` span
    ``num_steps × epochs × num_minibatches`` updates.
    """
    updates = config.num_steps * config.epochs * config.num_minibatches
    return make_optimizer(num_steps=updates, **config.optimizer.to_dict())


def load_scorer(workdir: str, key: str, seed: int):
    """``(graphdef, params, architecture)`` of the scalar model exported by a reward-model run."""
    if not workdir:
        raise ConfigError(f"config.{key} must name the workdir of a reward-model run")
    path = os.path.join(workdir, common.MODEL_FILE)
    if not os.path.exists(path):
        raise ConfigError(f"config.{key}={workdir!r}: no {common.MODEL_FILE} there")
    with open(path) as f:
        architecture = ModelConfig(**json.load(f))
    graphdef, params = split_model(ScalarModel(architecture, rngs=nnx.Rngs(seed)))
    return graphdef, common.import_params(workdir, "scorer", params), architecture


def copy_tree(tree):
    """A copy with fresh buffers (a frozen copy must not alias donated training params)."""
    return jax.tree.map(jnp.copy, tree)


def prompt_schedule(
    config: ml_collections.ConfigDict, tokenizer, task
) -> loop.EpochPermutationSchedule:
    """Training prompts, left-padded, with ``prompt_index`` into ``task.train_prompts``."""
    arrays = task_batches.task_prompt_arrays(
        task.train_prompts, tokenizer, max_length=config.prompt_length
    )
    arrays = {k: arrays[k] for k in ("input_ids", "attention_mask")}
    arrays["prompt_index"] = np.arange(len(task.train_prompts), dtype=np.int32)
    return loop.EpochPermutationSchedule(arrays, config.batch_size, seed=config.seed)


score_sequences = jax.jit(sequence_scores, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def sequence_log_ratios(
    policy_graphdef: nnx.GraphDef,
    policy_params,
    reference_params,
    tokens: jax.Array,
    attention_mask: jax.Array,
    response_mask: jax.Array,
) -> jax.Array:
    """``Σ_t [log π(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)]`` per row, ``[B]``.

    The sum runs over the response tokens (``response_mask``) of ``[B, L]`` sequences;
    ``π`` and ``π_ref`` share the decoder graph ``policy_graphdef``. For ``y ~ π`` this
    is the single-sample ("k1") estimate of the sequence-level KL(π ‖ π_ref) (Schulman,
    2020, "Approximating KL Divergence").
    """
    chex.assert_rank([tokens, attention_mask, response_mask], 2)
    chex.assert_equal_shape([tokens, attention_mask, response_mask])

    def log_probs(params):
        model = nnx.merge(policy_graphdef, params)
        _, per_sequence = sequence_logprobs(model, tokens, attention_mask, response_mask)
        return per_sequence

    return log_probs(policy_params) - log_probs(reference_params)


def colocate(tree, like):
    """``tree`` on the devices of ``like``'s arrays: replicated on their mesh, if any.

    A policy trained on a mesh is evaluated with frozen models (scorers, reference) that
    were loaded onto one device, and the same evaluator may next see a policy on one
    device again; a jitted call needs all its arguments on one device set.
    """
    sharding = jax.tree.leaves(like)[0].sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.device_put(tree, jax.sharding.NamedSharding(sharding.mesh, jax.P()))
    return jax.device_put(tree, next(iter(sharding.device_set)))


def sample_and_score(
    policy_graphdef: nnx.GraphDef,
    policy_params,
    arrays: dict,
    score,
    *,
    sampling: SamplingConfig,
    batch_size: int,
    tokenizer,
) -> tuple[list[str], dict[str, np.ndarray]]:
    """One reply per prompt of ``arrays``, decoded, with per-reply scores.

    The prompts go in fixed-size batches (:func:`rlhf_jax.data.task_batches.sequential_batches`);
    batch ``i`` samples with ``jax.random.key(i)``, so two policies are compared on the
    same random numbers. ``score(output) -> {name: [B] array}`` reads each batch's
    :class:`rlhf_jax.sampling.SampleOutput`; padding rows are dropped.

    Returns:
      The decoded replies and ``{name: [N] float64}``: every score and ``reply_length``
      (response tokens).
    """
    replies, columns = [], {}
    batches = task_batches.sequential_batches(arrays, batch_size=batch_size)
    for index, (batch, valid) in enumerate(batches):
        output = sample(
            policy_graphdef,
            policy_params,
            batch["input_ids"],
            batch["attention_mask"],
            jax.random.key(index),
            config=sampling,
        )
        tokens, mask, scores = jax.device_get((output.tokens, output.response_mask, score(output)))
        mask = np.asarray(mask)[:valid].astype(bool)
        scores = {**scores, "reply_length": mask.sum(axis=1)}
        for name, values in scores.items():
            columns.setdefault(name, []).append(np.asarray(values)[:valid])
        replies.extend(
            tokenizer.decode(row[keep]) for row, keep in zip(tokens[:valid], mask, strict=True)
        )
    return replies, {k: np.concatenate(v).astype(np.float64) for k, v in columns.items()}


def make_evaluator(config, tokenizer, task, policy_graphdef, scorers, reference_params=None):
    """``evaluate(policy_params) -> metrics`` on the first ``num_eval_prompts`` held-out prompts.

    Samples one reply per prompt (:func:`sample_and_score`), decodes it and reports
    the gold ``eval_gold_reward``, ``eval_gold_cost`` and ``eval_harm_rate``, per scorer
    name ``s`` in ``scorers`` (``{name: (graphdef, params)}``) ``eval_<s>_score`` and,
    given the reference (SFT) parameters, ``eval_kl``: the mean over the ``N`` prompts of
    :func:`sequence_log_ratios`,

        eval_kl = (1/N) Σ_i Σ_t [log π(y_it | x_i, y_i<t) − log π_ref(y_it | x_i, y_i<t)],

    the k1 Monte Carlo estimate of KL(π ‖ π_ref) between the distributions of replies
    (of at most ``max_new_tokens`` tokens), unbiased because ``y_i ~ π`` when
    ``config.temperature`` is 1 (the default); exactly 0 when ``π`` is the reference.
    """
    texts = [p.text for p in task.heldout_prompts[: config.num_eval_prompts]]
    arrays = task_batches.task_prompt_arrays(texts, tokenizer, max_length=config.prompt_length)
    arrays = {k: arrays[k] for k in ("input_ids", "attention_mask")}
    sampling = sampling_config(config, tokenizer)
    # Copies: the training state holds (and the loop donates) these models' own buffers.
    scorer_params = {name: copy_tree(params) for name, (_, params) in scorers.items()}
    if reference_params is not None:
        reference_params = copy_tree(reference_params)

    def evaluate(policy_params) -> dict[str, float]:
        nonlocal scorer_params, reference_params
        # The frozen models join the policy's devices (replicated on its mesh, if any).
        scorer_params, reference_params = colocate((scorer_params, reference_params), policy_params)

        def score(output):
            # Module-level jitted functions: runs with the same shapes share their programs.
            scores = {
                f"{name}_score": score_sequences(
                    scorers[name][0], params, output.tokens, output.attention_mask
                )
                for name, params in scorer_params.items()
            }
            if reference_params is not None:
                scores["kl"] = sequence_log_ratios(
                    policy_graphdef,
                    policy_params,
                    reference_params,
                    output.tokens,
                    output.attention_mask,
                    output.response_mask,
                )
            return scores

        replies, scores = sample_and_score(
            policy_graphdef,
            policy_params,
            arrays,
            score,
            sampling=sampling,
            batch_size=config.eval_batch_size,
            tokenizer=tokenizer,
        )
        metrics = {f"eval_{k}": v for k, v in score_responses(texts, replies).items()}
        for name in scorers:
            metrics[f"eval_{name}_score"] = float(np.mean(scores[f"{name}_score"]))
        if reference_params is not None:
            metrics["eval_kl"] = float(np.mean(scores["kl"]))
        metrics["eval_sample"] = f"{texts[0]!r} -> {replies[0]!r}"
        return metrics

    return evaluate


def train_with_evaluations(
    step, state, schedule, config, workdir, evaluate, policy_params, *, jit_step=True
):
    """The loop driver to ``num_steps``, stopping every ``eval_every`` steps to evaluate.

    Each segment is one call of :func:`rlhf_jax.train.loop.run` to the next evaluation
    step; the loop saves a checkpoint at the end of each segment and the next segment
    resumes from it (so a killed run also resumes, from its newest checkpoint). Each
    evaluation is labelled with the step the policy has reached; a segment that a
    restored checkpoint has already passed adds none. The run is placed on the mesh of
    ``config.mesh`` (:func:`experiments.common.place_on_mesh`). ``jit_step=False`` passes a host
    step (see :mod:`rlhf_jax.train.loop`). Returns ``(state, summary, history,
    evaluations)``: the summary of the whole call (its ``start_step`` and ``resumed``
    from the first segment), the metric records, and the evaluations of step 0 (the
    initial policy) and of every segment.
    """
    evaluations = [{"step": 0, **evaluate(policy_params(state))}]
    state, schedule, shardings = common.place_on_mesh(step, state, schedule, config)
    targets = [*range(config.eval_every, config.num_steps, config.eval_every), config.num_steps]
    first = None
    for target in targets:
        state, summary = loop.run(
            step,
            state,
            schedule,
            num_steps=target,
            workdir=workdir,
            checkpoint_every=config.checkpoint_every,
            log_every=config.log_every,
            config=config,
            progress=sys.stderr.isatty(),
            progress_keys=("reward_score", "kl"),
            jit_step=jit_step,
            **shardings,
        )
        if first is None:
            first = summary
        if summary.final_step > evaluations[-1]["step"]:
            evaluations.append({"step": summary.final_step, **evaluate(policy_params(state))})
    summary = dataclasses.replace(summary, start_step=first.start_step, resumed=first.resumed)
    history = read_jsonl(os.path.join(workdir, JSONL_NAME))
    return state, summary, history, evaluations


def training_summary(run_summary, history, evaluations, keys) -> dict:
    """Steps, resume, first and last values of the training ``keys`` and evaluations."""
    summary = {
        "steps": run_summary.final_step,
        "start_step": run_summary.start_step,
        "resumed": run_summary.resumed,
    }
    for key in keys:
        summary[f"{key}_first"], summary[f"{key}_last"] = history[0][key], history[-1][key]
    for name, value in evaluations[-1].items():
        if name.startswith("eval_") and name != "eval_sample":
            summary[f"{name}_initial"] = evaluations[0][name]
            summary[name] = value
    summary["evaluations"] = evaluations
    return summary


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train the policy with PPO, evaluate it along the way, export it; returns the summary."""
    validate_rollout(config, SCHEMA)
    tokenizer = common.build_tokenizer(config)
    task = common.build_task(config)
    architecture = common.model_config(config, tokenizer)
    decoder = common.build_decoder(config, architecture)
    policy_graphdef, policy_params = split_model(decoder)
    reward_graphdef, reward_params, _ = load_scorer(config.reward_from, "reward_from", config.seed)
    reference_params = copy_tree(policy_params)
    if config.shared_critic:
        head = PolicyWithValueHead(architecture, rngs=nnx.Rngs(config.seed + 1), policy=decoder)
        critic_graphdef, params = split_model(head)
    else:
        critic_graphdef = reward_graphdef
        params = {"policy": policy_params, "value": copy_tree(reward_params)}
    models = PPOModels(policy_graphdef, critic_graphdef, reward_graphdef, config.shared_critic)
    tx = build_rl_optimizer(config)
    ppo_config = PPOConfig(
        sampling=sampling_config(config, tokenizer),
        update=update_config(config),
        kl_target=config.kl_target or None,
        kl_horizon=config.kl_horizon,
    )
    extra = init_ppo_extra(
        reference_params=reference_params, reward_params=reward_params, kl_coef=config.kl_coef
    )
    state = TrainState.create(params, tx, rng=config.seed, extra=extra)
    evaluate = make_evaluator(
        config,
        tokenizer,
        task,
        policy_graphdef,
        {"reward": (reward_graphdef, reward_params)},
        reference_params=reference_params,
    )
    state, run_summary, history, evaluations = train_with_evaluations(
        make_ppo_step(models, tx, ppo_config),
        state,
        prompt_schedule(config, tokenizer, task),
        config,
        workdir,
        evaluate,
        lambda s: s.params["policy"],
    )
    common.export_params(workdir, "policy", state.params["policy"], architecture)
    keys = ("reward_score", "kl", "kl_coef", "reward_value_loss", "response_length")
    return common.finish(workdir, "PPO", training_summary(run_summary, history, evaluations, keys))


if __name__ == "__main__":
    common.main(run)
