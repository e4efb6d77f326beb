"""MA-RLHF on the embedded task: PPO whose actions are fixed-length token n-grams.

Chai et al. (2024), "MA-RLHF: Reinforcement Learning from Human Feedback with Macro
Actions": the PPO run of ``ppo.py`` (SFT policy and reference from ``init_from``, reward
model from ``reward_from``, critic on the policy's trunk or copied from the reward model)
with advantages, ratios and values over macros of ``macro_size`` tokens
(:mod:`rlhf_jax.train.steps.ma_rlhf`); ``macro_size=1`` is PPO. Evaluations are those of
``ppo.py``.

``python experiments/ma_rlhf.py --config=experiments/configs/ma_rlhf.py
--workdir=runs/ma_rlhf --config.init_from=runs/sft --config.reward_from=runs/rm``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import ml_collections
from flax import nnx

from experiments import common
from experiments import ppo as rl
from rlhf_jax.models import PolicyWithValueHead
from rlhf_jax.train.config import Field
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps.common import split_model
from rlhf_jax.train.steps.ma_rlhf import (
    GRANULARITIES,
    VALUE_WEIGHTINGS,
    MARLHFConfig,
    make_ma_rlhf_step,
)
from rlhf_jax.train.steps.ppo import PPOConfig, PPOModels, init_ppo_extra

SCHEMA = {
    **rl.SCHEMA,
    "macro_size": Field(int, minimum=1),
    "value_weighting": Field(str, choices=VALUE_WEIGHTINGS),
    "granularity": Field(str, choices=GRANULARITIES),
}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train the policy with MA-PPO, evaluate it along the way, export it; returns the summary."""
    rl.validate_rollout(config, SCHEMA)
    tokenizer = common.build_tokenizer(config)
    task = common.build_task(config)
    architecture = common.model_config(config, tokenizer)
    decoder = common.build_decoder(config, architecture)
    policy_graphdef, policy_params = split_model(decoder)
    reward_graphdef, reward_params, _ = rl.load_scorer(
        config.reward_from, "reward_from", config.seed
    )
    reference_params = rl.copy_tree(policy_params)
    if config.shared_critic:
        head = PolicyWithValueHead(architecture, rngs=nnx.Rngs(config.seed + 1), policy=decoder)
        critic_graphdef, params = split_model(head)
    else:
        critic_graphdef = reward_graphdef
        params = {"policy": policy_params, "value": rl.copy_tree(reward_params)}
    models = PPOModels(policy_graphdef, critic_graphdef, reward_graphdef, config.shared_critic)
    tx = rl.build_rl_optimizer(config)
    ma_config = MARLHFConfig(
        ppo=PPOConfig(
            sampling=rl.sampling_config(config, tokenizer),
            update=rl.update_config(config),
            kl_target=config.kl_target or None,
            kl_horizon=config.kl_horizon,
        ),
        macro_size=config.macro_size,
        value_weighting=config.value_weighting,
        granularity=config.granularity,
    )
    extra = init_ppo_extra(
        reference_params=reference_params, reward_params=reward_params, kl_coef=config.kl_coef
    )
    state = TrainState.create(params, tx, rng=config.seed, extra=extra)
    evaluate = rl.make_evaluator(
        config, tokenizer, task, policy_graphdef, {"reward": (reward_graphdef, reward_params)}
    )
    state, run_summary, history, evaluations = rl.train_with_evaluations(
        make_ma_rlhf_step(models, tx, ma_config),
        state,
        rl.prompt_schedule(config, tokenizer, task),
        config,
        workdir,
        evaluate,
        lambda s: s.params["policy"],
    )
    common.export_params(workdir, "policy", state.params["policy"], architecture)
    keys = ("reward_score", "kl", "kl_coef", "reward_value_loss", "macros_per_response")
    summary = rl.training_summary(run_summary, history, evaluations, keys)
    return common.finish(workdir, "MA-RLHF", {"macro_size": config.macro_size, **summary})


if __name__ == "__main__":
    common.main(run)
