"""CGPO on the embedded task: constrained policy optimisation with a mixture of judges.

Xu et al. (2024), "The Perfect Blend: Redefining RLHF with Mixture of Judges". The
policy and its reference start from an SFT run (``init_from``); every step samples
``num_samples`` replies per prompt plus one baseline reply from the reference, scores
them with the reward model (``reward_from``), and flags replies with three judges:

- rule-based, length: more than ``max_reply_tokens`` tokens (0: off);
- rule-based, harm markers (``ban_harm_markers``): the reply contains one of the
  embedded task's harm markers (``embedded_task.HARM_MARKERS``, as written and with a
  capital first letter) as a token sequence, which flags every reply the gold cost
  would count and a few more (a marker inside a longer word);
- model-based: the cost model's (``cost_from``) score exceeds ``cost_judge_threshold``
  (off when ``cost_from`` is empty).

The policy is updated by CRPG, CRRAFT or CODPO (``algorithm``; :mod:`rlhf_jax.train.steps.cgpo`).
Evaluations report the gold reward, cost and harm rate of held-out replies with the
reward- (and cost-) model scores; the summary adds the judges' violation rate over
training.

``python experiments/cgpo.py --config=experiments/configs/cgpo.py --workdir=runs/cgpo
--config.init_from=runs/sft --config.reward_from=runs/rm --config.cost_from=runs/cm``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import ml_collections

from experiments import common
from experiments import ppo as rl
from rlhf_jax.data.embedded_task import HARM_MARKERS
from rlhf_jax.train.config import ConfigError, Field
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps.cgpo import (
    UPDATES,
    CGPOConfig,
    CGPOModels,
    JudgeConfig,
    init_cgpo_extra,
    make_cgpo_step,
)
from rlhf_jax.train.steps.common import split_model

SCHEMA = {
    **rl.ROLLOUT_SCHEMA,
    "cost_from": Field(str),
    "algorithm": Field(str, choices=UPDATES),
    "num_samples": Field(int, minimum=1),
    "kl_coef": Field(float, minimum=0.0),
    "epochs": Field(int, minimum=1),
    "num_minibatches": Field(int, minimum=1),
    "max_reply_tokens": Field(int, minimum=0),
    "ban_harm_markers": Field(bool),
    "cost_judge_threshold": Field(float),
    "codpo_beta": Field(float, minimum=1e-6),
    "codpo_nll_coef": Field(float, minimum=0.0),
}


def harm_marker_sequences(tokenizer) -> tuple[tuple[int, ...], ...]:
    """Token sequences of every harm marker of the task, as written and capitalised."""
    texts = sorted({v for m in HARM_MARKERS.values() for w in m for v in (w, w.capitalize())})
    return tuple(tuple(int(i) for i in tokenizer.encode(text)) for text in texts)


def judges(config: ml_collections.ConfigDict, tokenizer) -> JudgeConfig:
    """The mixture of judges of ``config``."""
    return JudgeConfig(
        max_tokens=config.max_reply_tokens or None,
        banned_sequences=harm_marker_sequences(tokenizer) if config.ban_harm_markers else (),
        cost_threshold=config.cost_judge_threshold if config.cost_from else None,
    )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train the policy with CGPO, evaluate it along the way, export it; returns the summary."""
    rl.validate_rollout(config, SCHEMA)
    if config.algorithm == "codpo" and config.num_samples < 2:
        raise ConfigError("config.num_samples must be >= 2 for config.algorithm='codpo'")
    tokenizer = common.build_tokenizer(config)
    task = common.build_task(config)
    architecture = common.model_config(config, tokenizer)
    policy_graphdef, policy_params = split_model(common.build_decoder(config, architecture))
    reward_graphdef, reward_params, _ = rl.load_scorer(
        config.reward_from, "reward_from", config.seed
    )
    scorers = {"reward": (reward_graphdef, reward_params)}
    cost_graphdef = cost_params = None
    if config.cost_from:
        cost_graphdef, cost_params, _ = rl.load_scorer(config.cost_from, "cost_from", config.seed)
        scorers["cost"] = (cost_graphdef, cost_params)
    cgpo_config = CGPOConfig(
        sampling=rl.sampling_config(config, tokenizer),
        judges=judges(config, tokenizer),
        update=config.algorithm,
        num_samples=config.num_samples,
        codpo_beta=config.codpo_beta,
        codpo_nll_coef=config.codpo_nll_coef,
        kl_coef=config.kl_coef,
        epochs=config.epochs,
        num_minibatches=config.num_minibatches,
        num_micro_batches=config.num_micro_batches,
    )
    extra = init_cgpo_extra(
        reference_params=rl.copy_tree(policy_params),
        reward_params=reward_params,
        cost_params=cost_params,
    )
    tx = rl.build_rl_optimizer(config)
    state = TrainState.create({"policy": policy_params}, tx, rng=config.seed, extra=extra)
    models = CGPOModels(policy_graphdef, reward_graphdef, cost_graphdef)
    evaluate = rl.make_evaluator(config, tokenizer, task, policy_graphdef, scorers)
    state, run_summary, history, evaluations = rl.train_with_evaluations(
        make_cgpo_step(models, tx, cgpo_config),
        state,
        rl.prompt_schedule(config, tokenizer, task),
        config,
        workdir,
        evaluate,
        lambda s: s.params["policy"],
    )
    common.export_params(workdir, "policy", state.params["policy"], architecture)
    keys = ("reward_score", "calibrated_reward", "violation_rate", "response_length")
    summary = rl.training_summary(run_summary, history, evaluations, keys)
    return common.finish(workdir, f"CGPO ({config.algorithm})", summary)


if __name__ == "__main__":
    common.main(run)
