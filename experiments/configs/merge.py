"""Balanced Actor Initialization (Zheng et al., 2025): a two-stage merge of exported policies.

``python experiments/merge.py --config=experiments/configs/merge.py --workdir=runs/bai
--config.pretrained_from=runs/sft --config.instruct_from=runs/dpo
--config.reasoning_from=runs/raft``
"""

import ml_collections

from experiments.common import base_config


def get_config() -> ml_collections.ConfigDict:
    """BAI defaults: the balanced ratios α = β = 0.5; 64 held-out prompts at temperature 1."""
    config = base_config()
    config.pretrained_from = ""
    config.instruct_from = ""
    config.reasoning_from = ""
    config.instruct_weight = 0.5
    config.merged_weight = 0.5
    config.prompt_length = 80
    config.num_eval_prompts = 64
    config.sample_max_new_tokens = 160
    config.sample_temperature = 1.0
    return config
