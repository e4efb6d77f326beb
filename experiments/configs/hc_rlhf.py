"""HC-RLHF: Safe-RLHF under a pessimistic cost bound, then a held-out safety test.

``python experiments/hc_rlhf.py --config=experiments/configs/hc_rlhf.py
--workdir=runs/hc --config.init_from=runs/sft --config.reward_from=runs/rm
--config.cost_from=runs/cm`` (``hc_rlhf.py:tiny`` selects the smoke-test preset).
"""

import ml_collections

from experiments.configs.safe_rlhf import get_config as safe_rlhf_config


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    """Safe-RLHF's defaults plus the bound: δ = 0.1, κ_c = 0, κ_s = 2, 64 safety prompts.

    The safety prompts follow the ``num_eval_prompts`` evaluation prompts in the task's
    held-out prompts, so the tiny preset enlarges the held-out set to 16 (8 + 8).

    Args:
      preset: ``""`` or ``"tiny"`` (as for ``configs/ppo.py``).
    """
    config = safe_rlhf_config(preset)
    config.bound_delta = 0.1
    config.candidate_coef = 0.0
    config.safety_coef = 2.0
    config.num_safety_prompts = 64
    if preset == "tiny":
        config.num_safety_prompts = 8
        config.task.num_heldout_prompts = 16
    return config
