"""f-DPG on the embedded task: an SFT policy moved toward ``π_ref · exp(r/β)`` for an f-divergence.

The policy and the frozen reference start from an SFT run (``--config.init_from``), the
reward model from a reward-model run (``--config.reward_from``). Every step draws
``num_samples`` replies to each of ``batch_size`` training prompts and takes one
distributional policy-gradient step on ``D_f(π_θ ‖ p)``, ``p ∝ π_ref exp(r/β)``
(Go et al., 2023), for ``divergence`` in forward KL (the original DPG), reverse KL,
Jensen–Shannon or total variation. Every ``eval_every`` steps the policy answers
held-out prompts, scored by the gold reward, cost and harm rate and by the reward model.

``python experiments/fdpg.py --config=experiments/configs/fdpg.py --workdir=runs/fdpg
--config.init_from=runs/sft --config.reward_from=runs/rm --config.divergence=jensen_shannon``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import ml_collections

from experiments import common
from experiments import ppo as rl
from rlhf_jax.objectives.fdpg import DIVERGENCES
from rlhf_jax.train.config import ConfigError, Field
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps.common import split_model
from rlhf_jax.train.steps.fdpg import FDPGConfig, init_fdpg_extra, make_fdpg_step

SCHEMA = {
    **rl.ROLLOUT_SCHEMA,
    "num_samples": Field(int, minimum=2),
    "beta": Field(float, minimum=1e-6),
    "divergence": Field(str, choices=DIVERGENCES),
    "online": Field(bool),
}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train the policy with f-DPG, evaluate it along the way, export it; returns the summary."""
    rl.validate_rollout(config, SCHEMA)
    if config.num_micro_batches != 1:
        raise ConfigError("config.num_micro_batches must be 1: the f-DPG step does not split")
    if config.temperature != 1.0:
        raise ConfigError(
            f"config.temperature={config.temperature}: f-DPG's proposal is the policy itself, "
            "so replies are sampled at temperature 1"
        )
    tokenizer = common.build_tokenizer(config)
    task = common.build_task(config)
    architecture = common.model_config(config, tokenizer)
    policy_graphdef, params = split_model(common.build_decoder(config, architecture))
    reward_graphdef, reward_params, _ = rl.load_scorer(
        config.reward_from, "reward_from", config.seed
    )
    fdpg_config = FDPGConfig(
        sampling=rl.sampling_config(config, tokenizer),
        num_samples=config.num_samples,
        beta=config.beta,
        divergence=config.divergence,
        online=config.online,
    )
    extra = init_fdpg_extra(
        reference_params=rl.copy_tree(params),
        reward_params=reward_params,
        initial_params=None if config.online else rl.copy_tree(params),
    )
    tx = common.build_optimizer(config)
    state = TrainState.create(params, tx, rng=config.seed, extra=extra)
    evaluate = rl.make_evaluator(
        config, tokenizer, task, policy_graphdef, {"reward": (reward_graphdef, reward_params)}
    )
    state, run_summary, history, evaluations = rl.train_with_evaluations(
        make_fdpg_step(policy_graphdef, reward_graphdef, tx, fdpg_config),
        state,
        rl.prompt_schedule(config, tokenizer, task),
        config,
        workdir,
        evaluate,
        lambda s: s.params,
    )
    common.export_params(workdir, "policy", state.params, architecture)
    keys = ("divergence", "reward_score", "kl", "importance_weight", "response_length")
    summary = {"divergence_name": config.divergence, "beta": config.beta}
    summary.update(rl.training_summary(run_summary, history, evaluations, keys))
    return common.finish(workdir, "f-DPG", summary)


if __name__ == "__main__":
    common.main(run)
