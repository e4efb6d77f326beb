"""Safe-RLHF (PPO-Lagrangian) on the embedded task: maximise reward with expected cost ≤ d.

The policy and the reference start from an SFT run (``--config.init_from``); the reward
and cost models come from two reward-model runs (``--config.reward_from`` and
``--config.cost_from``, the latter with ``model_kind="cost"``), and each critic starts as
a copy of its scorer (Dai et al., 2023). The Lagrange multiplier λ, stored in the training
state, rises while the batch's mean cost exceeds ``cost_threshold`` and falls (to 0, or
towards 0 in log space) once it does not. Evaluations report the gold reward, gold cost
and harm rate of held-out replies with the reward- and cost-model scores.

``python experiments/safe_rlhf.py --config=experiments/configs/safe_rlhf.py
--workdir=runs/safe --config.init_from=runs/sft --config.reward_from=runs/rm
--config.cost_from=runs/cm``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import ml_collections

from experiments import common
from experiments import ppo as rl
from rlhf_jax.train.config import ConfigError, Field
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps.common import split_model
from rlhf_jax.train.steps.safe_rlhf import (
    SafeRLHFConfig,
    SafeRLHFModels,
    init_safe_rlhf_extra,
    make_safe_rlhf_step,
)

SCHEMA = {
    **rl.ROLLOUT_SCHEMA,
    **rl.PPO_SCHEMA,
    "cost_from": Field(str),
    "cost_threshold": Field(float),
    "multiplier_lr": Field(float, minimum=0.0),
    "initial_multiplier": Field(float, minimum=0.0),
    "log_multiplier": Field(bool),
    "normalise_advantages": Field(bool),
}


def train(
    config: ml_collections.ConfigDict, workdir: str, export_as: str = "policy", **options
) -> dict:
    """PPO-Lagrangian from ``config``: train, evaluate along the way, export the policy.

    Loads the policy (``init_from``), the reward and the cost model, trains with
    :func:`rlhf_jax.train.steps.safe_rlhf.make_safe_rlhf_step` through
    ``ppo.train_with_evaluations`` and exports the final policy as ``export_as``.
    ``options`` are further :class:`SafeRLHFConfig` fields (HC-RLHF's pessimistic bound).
    Returns the training summary.
    """
    if config.log_multiplier and config.initial_multiplier <= 0.0:
        raise ConfigError("config.initial_multiplier must be > 0 when config.log_multiplier")
    tokenizer = common.build_tokenizer(config)
    task = common.build_task(config)
    architecture = common.model_config(config, tokenizer)
    policy_graphdef, policy_params = split_model(common.build_decoder(config, architecture))
    reward_graphdef, reward_params, reward_arch = rl.load_scorer(
        config.reward_from, "reward_from", config.seed
    )
    cost_graphdef, cost_params, cost_arch = rl.load_scorer(
        config.cost_from, "cost_from", config.seed
    )
    if cost_arch != reward_arch:
        raise ConfigError(
            "config.cost_from: the cost model's architecture differs from the reward "
            "model's; both critics share one architecture"
        )
    params = {
        "policy": policy_params,
        "reward_value": rl.copy_tree(reward_params),
        "cost_value": rl.copy_tree(cost_params),
    }
    safe_config = SafeRLHFConfig(
        sampling=rl.sampling_config(config, tokenizer),
        update=rl.update_config(config),
        cost_threshold=config.cost_threshold,
        multiplier_lr=config.multiplier_lr,
        log_multiplier=config.log_multiplier,
        normalise_advantages=config.normalise_advantages,
        kl_target=config.kl_target or None,
        kl_horizon=config.kl_horizon,
        **options,
    )
    extra = init_safe_rlhf_extra(
        safe_config,
        reference_params=rl.copy_tree(policy_params),
        reward_params=reward_params,
        cost_params=cost_params,
        kl_coef=config.kl_coef,
        multiplier=config.initial_multiplier,
    )
    tx = rl.build_rl_optimizer(config)
    state = TrainState.create(params, tx, rng=config.seed, extra=extra)
    models = SafeRLHFModels(policy_graphdef, reward_graphdef, reward_graphdef, cost_graphdef)
    scorers = {"reward": (reward_graphdef, reward_params), "cost": (cost_graphdef, cost_params)}
    evaluate = rl.make_evaluator(
        config, tokenizer, task, policy_graphdef, scorers, reference_params=policy_params
    )
    state, run_summary, history, evaluations = rl.train_with_evaluations(
        make_safe_rlhf_step(models, tx, safe_config),
        state,
        rl.prompt_schedule(config, tokenizer, task),
        config,
        workdir,
        evaluate,
        lambda s: s.params["policy"],
    )
    common.export_params(workdir, export_as, state.params["policy"], architecture)
    keys = ("reward_score", "cost_score", "cost_bound", "lambda", "kl", "response_length")
    return rl.training_summary(run_summary, history, evaluations, keys)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train with PPO-Lagrangian, evaluate along the way, export the policy; returns the summary."""
    rl.validate_rollout(config, SCHEMA)
    return common.finish(workdir, "Safe-RLHF", train(config, workdir))


if __name__ == "__main__":
    common.main(run)
