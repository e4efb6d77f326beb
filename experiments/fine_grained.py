"""Fine-grained RLHF on the embedded task: sentence-level reward models and dense PPO rewards.

Wu et al. (2023), "Fine-Grained Human Feedback Gives Better Rewards for Language Model
Training". Two stages in one run, the policy and the reference from an SFT run
(``init_from``):

1. Two sentence-level reward models, each a scalar model on the SFT trunk, trained for
   ``segment_rm_steps`` on the task's SFT demonstrations with sentence labels derived
   from the gold functions. With ``y_{≤j}`` the response up to the end of its sentence
   ``j`` (sentences as in :func:`rlhf_jax.train.steps.fine_grained.sentence_segment_ids`)
   and ``y_{≤−1}`` the empty response, the labels are the increments

       helpfulness_j = r(x, y_{≤j}) − r(x, y_{≤j−1}),   harm_j = c(x, y_{≤j}) − c(x, y_{≤j−1}),

   of the gold reward ``r`` and the gold cost ``c``: what sentence ``j`` adds to the
   answer's helpfulness (relevant words, specifics, politeness, length, minus rudeness and
   repetition) and to its harm (the severity of a harm category whose first marker it
   contains). They telescope: a response's labels sum to ``r(x, y) − r(x, "")`` and
   ``c(x, y)``, and ``r(x, "") = 0``. The harm labels are the paper's per-sentence error
   flags weighted by severity; the helpfulness labels play the part of its relevance
   model.
2. PPO with the per-token reward ``r_t = Σ_j 1(t = T_j) (w_h R_help(j) − w_c R_harm(j)) −
   β k_t`` (``helpfulness_weight`` w_h, ``harm_weight`` w_c;
   :func:`rlhf_jax.train.steps.fine_grained.make_fine_grained_step`). The critic is a
   copy of the helpfulness model (or a value head on the policy with ``shared_critic``).

The reward models are exported under ``helpfulness_rm/`` and ``harm_rm/``, the policy
under ``policy/``; evaluations report the gold reward, cost and harm rate.

``python experiments/fine_grained.py --config=experiments/configs/fine_grained.py
--workdir=runs/fine_grained --config.init_from=runs/sft``
"""

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from experiments import common
from experiments import ppo as rl
from rlhf_jax.data import task_batches
from rlhf_jax.data.embedded_task import gold_cost, gold_reward
from rlhf_jax.models import PolicyWithValueHead, ScalarModel
from rlhf_jax.objectives.fine_grained import segment_ends
from rlhf_jax.train import loop
from rlhf_jax.train.config import Field
from rlhf_jax.train.metrics import JSONL_NAME, read_jsonl
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps.common import make_optimizer, split_model
from rlhf_jax.train.steps.fine_grained import (
    FineGrainedConfig,
    FineGrainedModels,
    init_fine_grained_extra,
    make_fine_grained_step,
    make_segment_reward_step,
    sentence_segment_ids,
)
from rlhf_jax.train.steps.ppo import PPOConfig

SCHEMA = {
    **{k: v for k, v in rl.SCHEMA.items() if k != "reward_from"},
    "segment_rm_steps": Field(int, minimum=1),
    "segment_rm_learning_rate": Field(float, minimum=0.0),
    "segment_rm_batch_size": Field(int, minimum=1),
    "helpfulness_weight": Field(float),
    "harm_weight": Field(float),
}
SEGMENT_MODELS = ("helpfulness", "harm")
GOLD = {"helpfulness": gold_reward, "harm": gold_cost}


def sentence_token_ids(tokenizer) -> dict:
    """Sentence-ending ids (``.!?``) and whitespace ids of the tokenizer, as tuples."""
    return {
        "end_ids": tuple(int(i) for i in tokenizer.encode(".!?")),
        "separator_ids": tuple(int(i) for i in tokenizer.encode(" \n")),
    }


def segment_label_arrays(examples, tokenizer, *, max_length: int) -> dict[str, np.ndarray]:
    """Demonstrations with sentence ends and the gold-increment labels of the module docstring.

    Returns:
      ``input_ids``, ``attention_mask``, ``segment_ends`` and per model ``<name>_labels``
      (the label of a sentence at its last token), each ``[N, L]``.
    """
    arrays = task_batches.task_sft_arrays(examples, tokenizer, max_length=max_length)
    response = arrays["loss_mask"].astype(np.float32)
    ids = np.asarray(
        sentence_segment_ids(
            jnp.asarray(arrays["input_ids"]),
            jnp.asarray(response),
            eos_id=tokenizer.eos_id,
            **sentence_token_ids(tokenizer),
        )
    )
    ends = np.asarray(segment_ends(jnp.asarray(response), jnp.asarray(ids)))
    labels = {name: np.zeros(response.shape, np.float32) for name in SEGMENT_MODELS}
    for row, example in enumerate(examples):
        previous = dict.fromkeys(SEGMENT_MODELS, 0.0)
        for position in np.flatnonzero(ends[row]):
            keep = (response[row] > 0) & (ids[row] <= ids[row, position])
            prefix = tokenizer.decode(arrays["input_ids"][row][keep])
            for name in SEGMENT_MODELS:
                value = GOLD[name](example.prompt, prefix)
                labels[name][row, position] = value - previous[name]
                previous[name] = value
    return {
        "input_ids": arrays["input_ids"],
        "attention_mask": arrays["attention_mask"],
        "segment_ends": ends.astype(np.float32),
        **{f"{name}_labels": labels[name] for name in SEGMENT_MODELS},
    }


def train_segment_models(config, tokenizer, task, architecture, workdir) -> tuple:
    """Stage 1: ``(graphdef, {name: params}, {name: (first loss, last loss)})``."""
    arrays = segment_label_arrays(task.sft_train, tokenizer, max_length=config.max_length)
    tx = make_optimizer(
        **{
            **config.optimizer.to_dict(),
            "learning_rate": config.segment_rm_learning_rate,
            "warmup_steps": 0,
        },
        num_steps=config.segment_rm_steps,
    )
    graphdef = None
    trained, losses = {}, {}
    step = None
    for index, name in enumerate(SEGMENT_MODELS):
        trunk = common.build_decoder(config, architecture)
        model = ScalarModel(architecture, rngs=nnx.Rngs(config.seed + 1 + index), trunk=trunk)
        graphdef, params = split_model(model)
        step = step or make_segment_reward_step(graphdef, tx)  # one program for both models
        data = {k: arrays[k] for k in ("input_ids", "attention_mask", "segment_ends")}
        data["segment_labels"] = arrays[f"{name}_labels"]
        schedule = loop.EpochPermutationSchedule(
            data, config.segment_rm_batch_size, seed=config.seed + index
        )
        model_dir = os.path.join(workdir, f"{name}_rm")
        state, _ = loop.run(
            step,
            TrainState.create(params, tx, rng=config.seed + index),
            schedule,
            num_steps=config.segment_rm_steps,
            workdir=model_dir,
            checkpoint_every=config.checkpoint_every,
            log_every=config.log_every,
            config=config,
            progress=sys.stderr.isatty(),
        )
        history = read_jsonl(os.path.join(model_dir, JSONL_NAME))
        losses[name] = (history[0]["loss"], history[-1]["loss"])
        common.export_params(model_dir, "scorer", state.params, architecture)
        trained[name] = state.params
    return graphdef, trained, losses


def fine_grained_run_state(
    config: ml_collections.ConfigDict,
    tokenizer,
    architecture,
    decoder: nnx.Module,
    segment_graphdef: nnx.GraphDef,
    segment_params: dict,
    *,
    critic_from: str,
    reward_weights: tuple[tuple[str, float], ...],
) -> tuple[FineGrainedModels, FineGrainedConfig, optax.GradientTransformation, TrainState]:
    """The models, step config, optimiser and initial state of a fine-grained PPO run.

    The policy is ``decoder``; the critic is a value head on it (``config.shared_critic``)
    or a copy of the segment model ``critic_from`` (Ouyang et al., 2022, §3.5, start the
    value function from the reward model); the reference is a copy of the policy;
    ``state.extra`` holds it, ``segment_params`` and ``config.kl_coef``.
    """
    policy_graphdef, policy_params = split_model(decoder)
    if config.shared_critic:
        head = PolicyWithValueHead(architecture, rngs=nnx.Rngs(config.seed + 1), policy=decoder)
        critic_graphdef, params = split_model(head)
    else:
        critic_graphdef = segment_graphdef
        params = {"policy": policy_params, "value": rl.copy_tree(segment_params[critic_from])}
    models = FineGrainedModels(
        policy_graphdef, critic_graphdef, segment_graphdef, config.shared_critic
    )
    fine_config = FineGrainedConfig(
        ppo=PPOConfig(
            sampling=rl.sampling_config(config, tokenizer),
            update=rl.update_config(config),
            kl_target=config.kl_target or None,
            kl_horizon=config.kl_horizon,
        ),
        reward_weights=reward_weights,
        **sentence_token_ids(tokenizer),
    )
    extra = init_fine_grained_extra(
        reference_params=rl.copy_tree(policy_params),
        segment_reward_params=segment_params,
        kl_coef=config.kl_coef,
    )
    tx = rl.build_rl_optimizer(config)
    return models, fine_config, tx, TrainState.create(params, tx, rng=config.seed, extra=extra)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train the sentence reward models, then the policy on their dense rewards."""
    rl.validate_rollout(config, SCHEMA)
    tokenizer = common.build_tokenizer(config)
    task = common.build_task(config)
    architecture = common.model_config(config, tokenizer)
    segment_graphdef, segment_params, rm_losses = train_segment_models(
        config, tokenizer, task, architecture, workdir
    )
    decoder = common.build_decoder(config, architecture)
    models, fine_config, tx, state = fine_grained_run_state(
        config,
        tokenizer,
        architecture,
        decoder,
        segment_graphdef,
        segment_params,
        critic_from="helpfulness",
        reward_weights=(("helpfulness", config.helpfulness_weight), ("harm", -config.harm_weight)),
    )
    evaluate = rl.make_evaluator(config, tokenizer, task, models.policy, {})
    state, run_summary, history, evaluations = rl.train_with_evaluations(
        make_fine_grained_step(models, tx, fine_config),
        state,
        rl.prompt_schedule(config, tokenizer, task),
        config,
        workdir,
        evaluate,
        lambda s: s.params["policy"],
    )
    common.export_params(workdir, "policy", state.params["policy"], architecture)
    keys = ("reward_score", "helpfulness_score", "harm_score", "sentences", "kl")
    summary = {}
    for name, (first, last) in rm_losses.items():
        summary[f"{name}_rm_loss_first"], summary[f"{name}_rm_loss_last"] = first, last
    summary.update(rl.training_summary(run_summary, history, evaluations, keys))
    return common.finish(workdir, "Fine-grained RLHF", summary)


if __name__ == "__main__":
    common.main(run)
