"""RAFT (Dong et al., 2023): online best-of-n fine-tuning against a trained reward model.

``python experiments/raft.py --config=experiments/configs/raft.py --workdir=runs/raft
--config.init_from=runs/sft --config.reward_from=runs/rm`` (``--config.online=False``
samples from the SFT policy throughout: offline RAFT).
"""

import ml_collections

from experiments.common import base_config


def get_config() -> ml_collections.ConfigDict:
    """RAFT defaults: best of 4 per prompt (local ranking), online, SFT learning rate 1e-4."""
    config = base_config()
    config.reward_from = ""
    config.prompt_length = 80
    config.max_new_tokens = 96
    config.temperature = 1.0
    config.eval_every = 50
    config.num_eval_prompts = 64
    config.num_samples = 4
    config.ranking = "local"
    config.top_k = 0  # global ranking: replies kept per batch (0: one per prompt)
    config.online = True
    config.optimizer.learning_rate = 1e-4
    config.optimizer.warmup_steps = 5
    config.batch_size = 16
    config.num_steps = 200
    return config
