"""MA-RLHF (PPO over macro actions) from an SFT policy against a trained reward model.

``python experiments/ma_rlhf.py --config=experiments/configs/ma_rlhf.py
--workdir=runs/ma_rlhf --config.init_from=runs/sft --config.reward_from=runs/rm``
(``ma_rlhf.py:tiny`` selects the smoke-test preset).
"""

import ml_collections

from experiments.configs.ppo import get_config as ppo_config


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    """PPO's defaults plus macros of ``macro_size`` tokens (4; 2 in the tiny preset).

    Args:
      preset: ``""`` or ``"tiny"`` (as for ``configs/ppo.py``).
    """
    config = ppo_config(preset)
    config.macro_size = 2 if preset == "tiny" else 4
    config.value_weighting = "first"
    config.granularity = "macro"
    return config
