"""PPO from an SFT policy against a trained reward model on the embedded task.

``python experiments/ppo.py --config=experiments/configs/ppo.py --workdir=runs/ppo
--config.init_from=runs/sft --config.reward_from=runs/rm`` (``ppo.py:tiny`` selects a
tiny smoke-test preset).
"""

import ml_collections

from experiments.common import base_config

TINY_TASK = {
    "num_train_prompts": 32,
    "num_heldout_prompts": 8,
    "num_sft": 32,
    "num_sft_heldout": 8,
    "num_preference_pairs": 32,
    "num_preference_heldout": 8,
}
TINY_MODEL = {
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "num_kv_heads": 1,
    "mlp_hidden_size": 64,
}


def shrink_to_tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The ``tiny`` preset: a smoke run of seconds (tiny task and model, 8 steps)."""
    config.task.update(TINY_TASK)
    config.model.update(TINY_MODEL)
    config.max_length = 64
    config.prompt_length = 40
    config.max_new_tokens = 8
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_eval_prompts = 8
    config.num_steps = 8
    config.eval_every = 4
    config.log_every = 1
    config.checkpoint_every = 100
    config.optimizer.warmup_steps = 0
    config.optimizer.learning_rate = 1e-2
    return config


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    """PPO defaults: KL in the reward with an adaptive β, separate critic from the RM.

    Args:
      preset: ``""`` for the defaults or ``"tiny"`` (``--config=.../ppo.py:tiny``) for a
        smoke run of seconds.
    """
    config = base_config()
    config.reward_from = ""
    config.prompt_length = 80
    config.max_new_tokens = 96
    config.temperature = 1.0
    config.eval_every = 50
    config.num_eval_prompts = 64
    config.kl_coef = 0.05
    config.kl_target = 6.0  # 0 keeps β fixed
    config.kl_horizon = 10000.0
    config.kl_mode = "reward"
    config.kl_estimator = "k1"
    config.epochs = 4
    config.num_minibatches = 2
    config.clip_eps = 0.2
    config.value_clip_eps = 0.2  # 0 disables value clipping
    config.value_coef = 0.5
    config.entropy_coef = 0.0
    config.gamma = 1.0
    config.lam = 0.95
    config.whiten_advantages = True
    config.shared_critic = False
    config.optimizer.learning_rate = 1e-5
    config.optimizer.warmup_steps = 5
    config.batch_size = 32
    config.num_steps = 200
    if preset not in ("", "tiny"):
        raise ValueError(f"unknown preset {preset!r} of experiments/configs/ppo.py: '' or 'tiny'")
    return shrink_to_tiny(config) if preset == "tiny" else config
