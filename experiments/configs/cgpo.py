"""CGPO (constrained RLHF with a mixture of judges) from an SFT policy on the embedded task.

``python experiments/cgpo.py --config=experiments/configs/cgpo.py --workdir=runs/cgpo
--config.init_from=runs/sft --config.reward_from=runs/rm --config.cost_from=runs/cm``
(``cgpo.py:tiny`` selects the smoke-test preset).
"""

import ml_collections

from experiments.configs.ppo import get_config as ppo_config

DROPPED_PPO_KEYS = (
    "shared_critic",
    "kl_target",
    "kl_horizon",
    "kl_mode",
    "kl_estimator",
    "clip_eps",
    "value_clip_eps",
    "value_coef",
    "entropy_coef",
    "gamma",
    "lam",
    "whiten_advantages",
)


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    """CRPG (or CRRAFT, CODPO) with 4 samples per prompt; judges: length, harm markers, cost.

    Args:
      preset: ``""`` or ``"tiny"`` (as for ``configs/ppo.py``; 4 prompts × 2 samples).
    """
    config = ppo_config(preset)
    for key in DROPPED_PPO_KEYS:
        del config[key]
    config.cost_from = ""  # "" runs without the model-based judge
    config.algorithm = "crpg"
    config.num_samples = 4
    config.kl_coef = 0.0
    config.epochs = 1
    config.num_minibatches = 1
    config.max_reply_tokens = 80  # the length judge; 0 turns it off
    config.ban_harm_markers = True
    config.cost_judge_threshold = 0.0
    config.codpo_beta = 0.1
    config.codpo_nll_coef = 1.0
    if preset == "tiny":
        config.batch_size = 4
        config.num_samples = 2
        config.max_reply_tokens = 0
    return config
