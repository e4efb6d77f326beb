r"""Fine-grained PPO on QA-Feedback prompts, driven by the span-trained C1 and C2 models.

Wu, Hu, Shi, Dziri, Suhr, Ammanabrolu, Smith, Ostendorf & Hajishirzi (2023),
"Fine-Grained Human Feedback Gives Better Rewards for Language Model Training", §4: the
long-form QA policy optimised with PPO against dense sentence rewards. The pieces come
from an earlier ``fine_grained_qa.py`` run (``segment_models_from``): its ``c1_rm/``
(irrelevance, repetition, incoherence) and ``c2_rm/`` (wrong grounding, unverifiable
facts) sentence models and its split of the records into training and held-out ones
(``data.json``); the policy trunk is ``init_from`` (that run's language-model pretrained
``lm/``, or any decoder run).

1. SFT. The trunk is fine-tuned for ``sft_steps`` on the training records' gold answers,
   each after its prompt (below), the next-token loss on the answer tokens
   (``task_batches.sft_arrays``, :func:`rlhf_jax.train.steps.make_sft_step`), and
   exported under ``sft/``. It is the PPO policy's start and the frozen reference.
2. PPO. Prompts are the training records' inputs rendered as the sentence models read
   them: :func:`experiments.fine_grained_qa.fitted_input` (question, blank line,
   passages cut to fit) as the human turn, cut to fewer than ``prompt_length`` tokens.
   With ``v_k(T_j)`` model ``k``'s flagged probability at the last token ``T_j`` of
   reply sentence ``j``, the per-token reward is the paper's eq. 1,

       r_t = Σ_k w_k Σ_j 1(t = T_j) (1 − 2 v_k(T_j))  −  β KL_t,

   ``w_1 = c1_weight``, ``w_2 = c2_weight`` (+w_k for a clean sentence, −w_k for a
   flagged one). :func:`rlhf_jax.train.steps.fine_grained.make_fine_grained_step` places
   ``Σ_k w_k s_k(T_j)`` for segment models ``s_k``; it is handed
   :func:`paper_segment_params`, each model with its head mapped affinely so that
   ``s_k = 1 − 2 v_k`` exactly (the same models, read on the paper's ±1 scale). The
   critic starts as a copy of that C1 model (Ouyang et al., 2022, §3.5, start the value
   function from the reward model), or is a value head on the policy (``shared_critic``).

The paper's third, holistic reward (C3, information completeness, a sequence-level
preference model trained on the file's ``preference`` rankings) is left out: the reward
here is C1 and C2 only.

Evaluation (every ``eval_every`` steps, first ``num_eval_prompts`` held-out records'
prompts, one sampled reply each): ``eval_<k>_flagged`` (the fraction of reply sentences
with ``v_k > ½``, over all replies), ``eval_dense_return`` (the mean of ``Σ_t r_t``
without the KL term, :func:`experiments.fine_grained_qa.paper_dense_rewards`),
``eval_sentences`` and ``eval_reply_length`` (per reply) and ``eval_kl`` (the k1
estimate of KL(π ‖ π_sft) of :func:`experiments.ppo.sequence_log_ratios`).

``python experiments/fine_grained_qa_ppo.py --config=experiments/configs/fine_grained_qa_ppo.py
--workdir=runs/fine_grained_qa_ppo --config.segment_models_from=runs/fine_grained_qa
--config.init_from=runs/fine_grained_qa/lm``
"""

import functools
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax import Array

from experiments import common, fine_grained_qa
from experiments import ppo as rl
from experiments.fine_grained import fine_grained_run_state, sentence_token_ids
from rlhf_jax.data import task_batches
from rlhf_jax.data.tokenizers import Tokenizer
from rlhf_jax.objectives.fine_grained import segment_ends
from rlhf_jax.train import loop
from rlhf_jax.train.config import ConfigError, Field, validate_config
from rlhf_jax.train.state import PyTree, TrainState
from rlhf_jax.train.steps import make_sft_step
from rlhf_jax.train.steps.common import make_optimizer, split_model
from rlhf_jax.train.steps.fine_grained import (
    make_fine_grained_step,
    sentence_segment_ids,
)

MODELS = tuple(fine_grained_qa.MODEL_TYPES)
OWN_SCHEMA = {
    **{k: v for k, v in rl.SCHEMA.items() if k != "reward_from"},
    "segment_models_from": Field(str),
    "sft_steps": Field(int, minimum=0),
    "sft_learning_rate": Field(float, minimum=0.0),
    **{f"{name}_weight": Field(float) for name in MODELS},
}
SCHEMA = {**{k: v for k, v in common.BASE_SCHEMA.items() if k != "task"}, **OWN_SCHEMA}


def validate(config: ml_collections.ConfigDict) -> None:
    """Check every key (the shared ones less ``task``) and the rollout's constraints.

    Raises:
      ConfigError: naming each wrong key (see :func:`experiments.ppo.validate_rollout`).
    """
    validate_config(config, SCHEMA)
    with_task = ml_collections.ConfigDict(config.to_dict())
    with_task.task = common.base_config().task  # only to reuse the shared cross-key checks
    rl.validate_rollout(with_task, OWN_SCHEMA)


def prompt_turns(
    examples: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *, prompt_length: int
) -> list[str]:
    """Each record's human turn, cut so that its generation prompt fits ``prompt_length``.

    Raises:
      ConfigError: naming ``config.prompt_length`` when a question alone does not fit.
    """
    turns = [
        fine_grained_qa.fitted_input(ex, "", tokenizer, max_length=prompt_length) for ex in examples
    ]
    if any(turn is None for turn in turns):
        raise ConfigError(
            f"config.prompt_length={prompt_length} is shorter than a record's question"
        )
    return turns


def prompt_arrays(turns: Sequence[str], tokenizer: Tokenizer, *, prompt_length: int) -> dict:
    """Left-padded generation prompts ``input_ids``, ``attention_mask`` ``[N, prompt_length]``."""
    arrays = task_batches.prompt_arrays(
        [[("human", turn)] for turn in turns],
        tokenizer,
        max_length=prompt_length,
        on_too_long="raise",
    )
    return {k: arrays[k] for k in ("input_ids", "attention_mask")}


def paper_segment_params(graphdef: nnx.GraphDef, params: PyTree) -> PyTree:
    """A sentence model's parameters with its head mapped to ``s = 1 − 2 v``.

    The scalar head computes ``v = h · w + b``; kernel ``−2 w`` and bias ``1 − 2 b`` give
    ``1 − 2 v`` for the same trunk features ``h``: the paper's segment reward (+1 clean,
    −1 flagged) as the model's own output.
    """
    model = nnx.merge(graphdef, rl.copy_tree(params))  # the given params stay as they are
    model.head.kernel[...] = -2.0 * model.head.kernel[...]
    model.head.bias[...] = 1.0 - 2.0 * model.head.bias[...]
    _, mapped = split_model(model)
    return mapped


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("weights", "sentence_ids"))
def reply_scores(
    segment_graphdef: nnx.GraphDef,
    segment_params: Mapping[str, PyTree],
    tokens: Array,
    attention_mask: Array,
    response_mask: Array,
    *,
    weights: tuple[float, ...],
    sentence_ids: tuple[tuple[int, ...], tuple[int, ...], int],
) -> dict[str, Array]:
    """Per reply ``[B]``: sentences, flagged sentences per model, and the dense return.

    Sentences are split as the PPO step splits them (``sentence_segment_ids`` with
    ``sentence_ids = (end_ids, separator_ids, eos_id)``); model ``k`` flags sentence
    ``j`` when ``v_k(T_j) > ½``; the return is ``Σ_t`` of
    :func:`experiments.fine_grained_qa.paper_dense_rewards` with ``weights``.
    """
    end_ids, separator_ids, eos_id = sentence_ids
    segment_ids = sentence_segment_ids(
        tokens, response_mask, end_ids=end_ids, separator_ids=separator_ids, eos_id=eos_id
    )
    ends = segment_ends(response_mask, segment_ids)
    scalars = [
        nnx.merge(segment_graphdef, segment_params[name])(tokens, attention_mask=attention_mask)
        for name in MODELS
    ]
    rewards = fine_grained_qa.paper_dense_rewards(scalars, segment_ids, response_mask, weights)
    scores = {
        "sentences": jnp.sum(ends, axis=1).astype(jnp.float32),
        "dense_return": jnp.sum(rewards, axis=1),
    }
    for name, values in zip(MODELS, scalars, strict=True):
        scores[f"{name}_flagged"] = jnp.sum(ends & (values > 0.5), axis=1).astype(jnp.float32)
    return scores


def make_qa_evaluator(
    config: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    turns: Sequence[str],
    policy_graphdef: nnx.GraphDef,
    segment_graphdef: nnx.GraphDef,
    segment_params: Mapping[str, PyTree],
    reference_params: PyTree,
):
    """``evaluate(policy_params) -> metrics`` on the prompts of ``turns`` (module docstring).

    One reply per prompt, sampled with a fixed key per batch (so two policies are compared
    on the same random numbers).
    """
    arrays = prompt_arrays(turns, tokenizer, prompt_length=config.prompt_length)
    sampling = rl.sampling_config(config, tokenizer)
    tokens_of = sentence_token_ids(tokenizer)
    sentence_ids = (tokens_of["end_ids"], tokens_of["separator_ids"], tokenizer.eos_id)
    weights = tuple(config[f"{name}_weight"] for name in MODELS)
    frozen = rl.copy_tree((dict(segment_params), reference_params))

    def evaluate(policy_params) -> dict[str, Any]:
        nonlocal frozen
        frozen = rl.colocate(frozen, policy_params)
        scorers, reference = frozen

        def score(output):
            scores = reply_scores(
                segment_graphdef,
                scorers,
                output.tokens,
                output.attention_mask,
                output.response_mask,
                weights=weights,
                sentence_ids=sentence_ids,
            )
            scores["kl"] = rl.sequence_log_ratios(
                policy_graphdef,
                policy_params,
                reference,
                output.tokens,
                output.attention_mask,
                output.response_mask,
            )
            return scores

        replies, totals = rl.sample_and_score(
            policy_graphdef,
            policy_params,
            arrays,
            score,
            sampling=sampling,
            batch_size=config.eval_batch_size,
            tokenizer=tokenizer,
        )
        sentences = float(np.sum(totals["sentences"]))
        metrics = {
            f"eval_{name}_flagged": float(np.sum(totals[f"{name}_flagged"]) / max(sentences, 1))
            for name in MODELS
        }
        for key in ("dense_return", "sentences", "reply_length", "kl"):
            metrics[f"eval_{key}"] = float(np.mean(totals[key]))
        metrics["eval_sample"] = f"{turns[0][:80]!r}... -> {replies[0]!r}"
        return metrics

    return evaluate


def supervised_stage(
    config: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    graphdef: nnx.GraphDef,
    params: PyTree,
    examples: Sequence[Mapping[str, Any]],
    turns: Sequence[str],
    workdir: str,
) -> tuple[PyTree, dict[str, float]]:
    """Stage 1: ``sft_steps`` of SFT on ``prompt → gold answer``; ``(params, report)``.

    The dialogues are cut at ``max_length`` tokens (a long gold answer loses its end).
    """
    dialogues = [
        [("human", turn), ("assistant", ex["gold"])]
        for ex, turn in zip(examples, turns, strict=True)
    ]
    arrays = task_batches.sft_arrays(dialogues, tokenizer, max_length=config.max_length)
    sft_config = ml_collections.ConfigDict(config.to_dict())
    sft_config.num_steps = config.sft_steps
    tx = make_optimizer(
        num_steps=config.sft_steps,
        **{**config.optimizer.to_dict(), "learning_rate": config.sft_learning_rate},
    )
    step = make_sft_step(graphdef, tx, num_micro_batches=config.num_micro_batches)
    state, _, history = common.train(
        step,
        TrainState.create(params, tx, rng=config.seed),
        loop.EpochPermutationSchedule(arrays, config.batch_size, seed=config.seed),
        sft_config,
        workdir,
        tx=tx,
    )
    report = {"sft_loss_first": history[0]["loss"], "sft_loss_last": history[-1]["loss"]}
    return jax.tree.map(jnp.asarray, jax.device_get(state.params)), report  # off the mesh


def load_segment_models(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, dict]:
    """``(graphdef, {name: params})`` of the ``c1_rm/`` and ``c2_rm/`` exports.

    Raises:
      ConfigError: naming ``config.segment_models_from`` when a model is missing or reads
        fewer positions than ``config.max_length``.
    """
    graphdef, params = None, {}
    for name in MODELS:
        path = os.path.join(config.segment_models_from, f"{name}_rm")
        graphdef, params[name], architecture = rl.load_scorer(
            path, "segment_models_from", config.seed
        )
        if architecture.max_position_embeddings < config.max_length:
            raise ConfigError(
                f"config.segment_models_from={config.segment_models_from!r}: {name}_rm reads "
                f"{architecture.max_position_embeddings} positions < config.max_length="
                f"{config.max_length}"
            )
    return graphdef, params


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """SFT on the gold answers, then fine-grained PPO; evaluate, export; returns the summary."""
    validate(config)
    os.makedirs(workdir, exist_ok=True)
    tokenizer = common.build_tokenizer(config)
    segment_graphdef, segment_params = load_segment_models(config)
    settings = fine_grained_qa.load_data_settings(config.segment_models_from, "segment_models_from")
    train_examples, heldout_examples = fine_grained_qa.split_examples(settings, tokenizer, workdir)
    train_turns = prompt_turns(train_examples, tokenizer, prompt_length=config.prompt_length)
    eval_examples = heldout_examples[: config.num_eval_prompts]
    eval_turns = prompt_turns(eval_examples, tokenizer, prompt_length=config.prompt_length)
    architecture = common.model_config(config, tokenizer)
    decoder = common.build_decoder(config, architecture)
    policy_graphdef, policy_params = split_model(decoder)
    summary: dict[str, Any] = {"train_prompts": len(train_turns), "eval_prompts": len(eval_turns)}
    if config.sft_steps:
        sft_dir = os.path.join(workdir, "sft")
        policy_params, report = supervised_stage(
            config,
            tokenizer,
            policy_graphdef,
            policy_params,
            train_examples,
            train_turns,
            sft_dir,
        )
        common.export_params(sft_dir, "policy", policy_params, architecture)
        summary.update(report)
        nnx.update(decoder, policy_params)
    paper_params = {n: paper_segment_params(segment_graphdef, p) for n, p in segment_params.items()}
    models, fine_config, tx, state = fine_grained_run_state(
        config,
        tokenizer,
        architecture,
        decoder,
        segment_graphdef,
        paper_params,
        critic_from=MODELS[0],
        reward_weights=tuple((name, config[f"{name}_weight"]) for name in MODELS),
    )
    evaluate = make_qa_evaluator(
        config,
        tokenizer,
        eval_turns,
        policy_graphdef,
        segment_graphdef,
        segment_params,
        state.extra["reference_params"],
    )
    schedule = loop.EpochPermutationSchedule(
        prompt_arrays(train_turns, tokenizer, prompt_length=config.prompt_length),
        config.batch_size,
        seed=config.seed,
    )
    state, run_summary, history, evaluations = rl.train_with_evaluations(
        make_fine_grained_step(models, tx, fine_config),
        state,
        schedule,
        config,
        workdir,
        evaluate,
        lambda s: s.params["policy"],
    )
    common.export_params(workdir, "policy", state.params["policy"], architecture)
    keys = ("reward_score", *(f"{name}_score" for name in MODELS), "sentences", "kl")
    summary.update(rl.training_summary(run_summary, history, evaluations, keys))
    return common.finish(workdir, "Fine-grained PPO on QA-Feedback", summary)


if __name__ == "__main__":
    common.main(run)
