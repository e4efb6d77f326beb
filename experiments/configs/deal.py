"""DeAL decoding of the pipeline's SFT policy, guided by its reward and cost models.

``python experiments/deal.py --config=experiments/configs/deal.py --workdir=runs/deal
--config.init_from=runs/pipeline/sft --config.reward_from=runs/pipeline/reward_model
--config.cost_from=runs/pipeline/cost_model`` (``deal.py:tiny`` is a smoke preset). The
shared keys (task, model, ``max_length``) are the pipeline's, so its runs can be loaded.
"""

import ml_collections

from experiments.common import base_config
from experiments.configs.pipeline import shared_config


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    """DeAL defaults: 32 prompts, 2 beams of 3 candidates, 4-token lookahead, λ = 2.

    Args:
      preset: ``""`` or ``"tiny"`` (a seconds-long smoke run).
    """
    if preset not in ("", "tiny"):
        raise ValueError(f"unknown preset {preset!r} of experiments/configs/deal.py: '' or 'tiny'")
    tiny = preset == "tiny"
    config = base_config()
    for key, value in shared_config(tiny).items():
        config[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    config.reward_from = ""
    config.cost_from = ""
    config.prompt_length = 40 if tiny else 72
    config.max_new_tokens = 6 if tiny else 64
    config.num_eval_prompts = 4 if tiny else 32
    config.eval_batch_size = 4 if tiny else 16
    config.temperature = 1.0
    config.beam_width = 1 if tiny else 2
    config.num_candidates = 3
    config.lookahead = 2 if tiny else 4
    config.reward_weights = (1.0,) if tiny else (2.0,)
    config.cost_weight = 1.0
    config.keyword = "Hello"
    config.keyword_weight = 10.0
    return config
