"""MORLHF (PPO on w·r − (1 − w)·c) against MODPO over several weightings w.

``python experiments/morlhf.py --config=experiments/configs/morlhf.py --workdir=runs/morlhf
--config.init_from=runs/pipeline/sft --config.reward_from=runs/pipeline/reward_model
--config.cost_from=runs/pipeline/cost_model`` (``morlhf.py:tiny`` is a smoke preset). The
task, model and rollout settings are the pipeline's PPO stage's, shortened.
"""

import ml_collections

from experiments.configs.pipeline import PROMPT_LENGTH, shared_config
from experiments.configs.ppo import get_config as ppo_config


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    """Defaults: w ∈ {0.2, 0.5, 0.8}; 30 PPO iterations and 60 MODPO steps per weighting.

    Args:
      preset: ``""`` or ``"tiny"`` (a seconds-long smoke run with two weightings).
    """
    if preset not in ("", "tiny"):
        raise ValueError(f"unknown preset {preset!r} of experiments/configs/morlhf.py")
    tiny = preset == "tiny"
    config = ppo_config(preset)
    del config["shared_critic"]
    for key, value in shared_config(tiny).items():
        config[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    config.cost_from = ""
    config.weightings = (0.5, 1.0) if tiny else (0.2, 0.5, 0.8)
    config.prompt_length = 40 if tiny else PROMPT_LENGTH
    config.max_new_tokens = 8 if tiny else 96
    config.batch_size = 8 if tiny else 16
    config.num_steps = 2 if tiny else 30
    config.eval_every = config.num_steps
    config.num_eval_prompts = 8 if tiny else 64
    config.eval_batch_size = 8 if tiny else 32
    config.epochs = 2
    config.num_minibatches = 1
    config.kl_coef = 0.1
    config.kl_target = 0.0  # a fixed β, as in the pipeline
    config.optimizer.learning_rate = 1e-3 if tiny else 1e-4
    config.log_every = 1 if tiny else 10
    config.checkpoint_every = 1000
    config.modpo_beta = 0.1
    config.modpo_num_steps = 2 if tiny else 60
    config.modpo_batch_size = 8 if tiny else 16
    config.modpo_learning_rate = 1e-3 if tiny else 2e-4
    return config
