"""Safe-RLHF (PPO-Lagrangian) from an SFT policy with trained reward and cost models.

``python experiments/safe_rlhf.py --config=experiments/configs/safe_rlhf.py
--workdir=runs/safe --config.init_from=runs/sft --config.reward_from=runs/rm
--config.cost_from=runs/cm``
"""

import ml_collections

from experiments.configs.ppo import get_config as ppo_config


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    """PPO's defaults plus the constraint: cost threshold 0, λ₀ = 1, direct dual ascent.

    Args:
      preset: ``""`` or ``"tiny"`` (as for ``configs/ppo.py``).
    """
    config = ppo_config(preset)
    del config["shared_critic"]
    config.cost_from = ""
    config.cost_threshold = 0.0
    config.multiplier_lr = 0.05
    config.initial_multiplier = 1.0
    config.log_multiplier = False
    config.normalise_advantages = True
    config.whiten_advantages = False
    return config
