"""RAFT on the embedded task: best-of-n replies by a trained reward model, then SFT on them.

The policy starts from an SFT run (``--config.init_from``) and the reward model from a
reward-model run (``--config.reward_from``). Every step draws ``num_samples`` replies to
each of ``batch_size`` training prompts, keeps the best by the reward model (or the
global top ``top_k``) and takes one SFT step on them (Dong et al., 2023, Algorithm 1);
``online=False`` samples from the frozen SFT policy instead of the current one (offline
RAFT). Every ``eval_every`` steps the policy answers held-out prompts, scored by the gold
reward, cost and harm rate and by the reward model.

``python experiments/raft.py --config=experiments/configs/raft.py --workdir=runs/raft
--config.init_from=runs/sft --config.reward_from=runs/rm``
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
from rlhf_jax.train.steps.raft import RANKINGS, RAFTConfig, init_raft_extra, make_raft_step

SCHEMA = {
    **rl.ROLLOUT_SCHEMA,
    "num_samples": Field(int, minimum=1),
    "ranking": Field(str, choices=RANKINGS),
    "top_k": Field(int, minimum=0),
    "online": Field(bool),
}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train the policy with RAFT, evaluate it along the way, export it; returns the summary."""
    rl.validate_rollout(config, SCHEMA)
    if config.top_k > config.batch_size * config.num_samples:
        raise ConfigError(
            f"config.top_k={config.top_k} exceeds the {config.batch_size * config.num_samples} "
            "replies of a batch (batch_size × num_samples)"
        )
    tokenizer = common.build_tokenizer(config)
    task = common.build_task(config)
    architecture = common.model_config(config, tokenizer)
    policy_graphdef, params = split_model(common.build_decoder(config, architecture))
    reward_graphdef, reward_params, _ = rl.load_scorer(
        config.reward_from, "reward_from", config.seed
    )
    raft_config = RAFTConfig(
        sampling=rl.sampling_config(config, tokenizer),
        num_samples=config.num_samples,
        ranking=config.ranking,
        top_k=config.top_k or None,
        online=config.online,
        num_micro_batches=config.num_micro_batches,
    )
    extra = init_raft_extra(
        reward_params=reward_params,
        initial_params=None if config.online else rl.copy_tree(params),
    )
    tx = common.build_optimizer(config)
    state = TrainState.create(params, tx, rng=config.seed, extra=extra)
    evaluate = rl.make_evaluator(
        config, tokenizer, task, policy_graphdef, {"reward": (reward_graphdef, reward_params)}
    )
    state, run_summary, history, evaluations = rl.train_with_evaluations(
        make_raft_step(policy_graphdef, reward_graphdef, tx, raft_config),
        state,
        rl.prompt_schedule(config, tokenizer, task),
        config,
        workdir,
        evaluate,
        lambda s: s.params,
    )
    common.export_params(workdir, "policy", state.params, architecture)
    keys = ("loss", "selected_reward", "mean_reward", "response_length")
    summary = {"online": config.online, "ranking": config.ranking}
    summary.update(rl.training_summary(run_summary, history, evaluations, keys))
    return common.finish(workdir, "RAFT", summary)


if __name__ == "__main__":
    common.main(run)
