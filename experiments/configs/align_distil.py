"""AlignDistil (Zhang et al., 2025): token-level distillation toward a DPO-and-reference teacher.

``python experiments/align_distil.py --config=experiments/configs/align_distil.py
--workdir=runs/align_distil --config.init_from=runs/sft --config.dpo_from=runs/dpo``
"""

import ml_collections

from experiments.common import base_config


def get_config() -> ml_collections.ConfigDict:
    """AlignDistil defaults: c = 2 (extrapolating past the DPO policy), reverse KL."""
    config = base_config()
    config.dpo_from = ""
    config.prompt_length = 80
    config.max_new_tokens = 96
    config.temperature = 1.0
    config.eval_every = 50
    config.num_eval_prompts = 64
    config.coefficient = 2.0
    config.direction = "reverse"
    config.optimizer.learning_rate = 1e-4
    config.optimizer.warmup_steps = 5
    config.batch_size = 16
    config.num_steps = 200
    return config
