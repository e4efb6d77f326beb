"""Fine-grained RLHF: sentence-level helpfulness and harm models, then PPO on dense rewards.

``python experiments/fine_grained.py --config=experiments/configs/fine_grained.py
--workdir=runs/fine_grained --config.init_from=runs/sft`` (``fine_grained.py:tiny``
selects the smoke-test preset).
"""

import ml_collections

from experiments.configs.ppo import get_config as ppo_config


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    """PPO's defaults with two sentence-level reward models trained first (same run).

    Args:
      preset: ``""`` or ``"tiny"`` (as for ``configs/ppo.py``; 16 reward-model steps).
    """
    config = ppo_config(preset)
    del config["reward_from"]
    config.segment_rm_steps = 16 if preset == "tiny" else 300
    config.segment_rm_learning_rate = 3e-3 if preset == "tiny" else 5e-4
    config.segment_rm_batch_size = 8 if preset == "tiny" else 16
    config.helpfulness_weight = 1.0
    config.harm_weight = 1.0
    return config
