"""Supervised fine-tuning of a ~5M-parameter byte-level Llama on the embedded task's demonstrations.

``python experiments/sft.py --config=experiments/configs/sft.py --workdir=runs/sft``
"""

import ml_collections

from experiments.common import base_config


def get_config() -> ml_collections.ConfigDict:
    """SFT defaults: token-normalised NLL; four replies sampled at temperature 1 at the end."""
    config = base_config()
    config.normalisation = "token"
    config.packing = False
    config.prompt_length = 80
    config.num_samples = 4
    config.sample_max_new_tokens = 160
    config.sample_temperature = 1.0
    return config
