"""f-DPG (Go et al., 2023) toward ``π_ref · exp(r/β)`` with a trained reward model.

``python experiments/fdpg.py --config=experiments/configs/fdpg.py --workdir=runs/fdpg
--config.init_from=runs/sft --config.reward_from=runs/rm`` (``--config.divergence=`` one
of ``forward_kl``, ``reverse_kl``, ``jensen_shannon``, ``total_variation``).
"""

import ml_collections

from experiments.common import base_config


def get_config() -> ml_collections.ConfigDict:
    """f-DPG defaults: Jensen–Shannon (the paper's best trade-off), β = 0.1, 4 samples."""
    config = base_config()
    config.reward_from = ""
    config.prompt_length = 80
    config.max_new_tokens = 96
    config.temperature = 1.0
    config.eval_every = 50
    config.num_eval_prompts = 64
    config.num_samples = 4
    config.beta = 0.1
    config.divergence = "jensen_shannon"
    config.online = True
    config.optimizer.learning_rate = 1e-5
    config.optimizer.warmup_steps = 5
    config.batch_size = 16
    config.num_steps = 200
    return config
