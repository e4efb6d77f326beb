"""Nash-MD from an SFT policy, against the task's non-transitive oracle or a reward model.

``python experiments/nash_md.py --config=experiments/configs/nash_md.py
--workdir=runs/nash --config.init_from=runs/sft`` (add
``--config.preference=reward_model --config.reward_from=runs/rm`` for a reward-model
preference, ``--config.preference=judge --config.judge_from=runs/sft`` for an LM judge's
verdict probabilities, ``--config.loss=ipo_md`` or ``online_ipo`` for the IPO variants).
"""

import ml_collections

from experiments.common import base_config
from experiments.configs.ppo import shrink_to_tiny


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    """Nash-MD-PG defaults: mixture β = 0.125, τ = 0.05, the oracle's default noise.

    Args:
      preset: ``""`` or ``"tiny"`` (as for ``configs/ppo.py``).
    """
    config = base_config()
    config.reward_from = ""
    config.prompt_length = 80
    config.max_new_tokens = 96
    config.temperature = 1.0
    config.eval_every = 50
    config.num_eval_prompts = 64
    config.preference = "oracle"
    config.judge_from = ""
    config.loss = "nash_md"
    config.mixture_beta = 0.125
    config.tau = 0.05
    config.oracle_temperature = 1.0
    config.oracle_cycle_strength = 2.0
    config.optimizer.learning_rate = 1e-5
    config.optimizer.warmup_steps = 5
    config.batch_size = 32
    config.num_steps = 200
    if preset not in ("", "tiny"):
        raise ValueError(f"unknown preset {preset!r} of experiments/configs/nash_md.py")
    return shrink_to_tiny(config) if preset == "tiny" else config
