"""Fine-grained PPO on QA-Feedback prompts with the C1 and C2 sentence models as rewards.

``python experiments/fine_grained_qa_ppo.py --config=experiments/configs/fine_grained_qa_ppo.py
--workdir=runs/fine_grained_qa_ppo --config.segment_models_from=runs/fine_grained_qa
--config.init_from=runs/fine_grained_qa/lm`` (``fine_grained_qa_ppo.py:tiny`` and
``:small`` select the smoke-test and the CPU-sized presets; ``:small`` matches
``fine_grained_qa.py:small``'s model).
"""

import ml_collections

from experiments.configs.fine_grained_qa import SMALL_MODEL
from experiments.configs.ppo import TINY_MODEL
from experiments.configs.ppo import get_config as ppo_config

PRESETS = ("", "tiny", "small")


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    """PPO's defaults less the embedded task and ``reward_from``, plus the QA-specific keys.

    The reply is cut at ``max_new_tokens`` after a prompt of fewer than ``prompt_length``
    tokens (the passages are cut to fit). ``c1_weight`` and ``c2_weight`` are the ``w_k``
    of the dense reward.

    Args:
      preset: ``""`` (the ~5M-parameter byte model, 768-token prompts, 256-token replies),
        ``"tiny"`` (a tiny model, a smoke run of seconds) or ``"small"`` (a two-layer
        model, 384-token prompts, 96-token replies, 100 SFT steps, 40 PPO iterations).

    Raises:
      ValueError: for an unknown preset.
    """
    if preset not in PRESETS:
        raise ValueError(
            f"unknown preset {preset!r} of configs/fine_grained_qa_ppo.py: '', 'tiny' or 'small'"
        )
    config = ppo_config()
    del config["task"]
    del config["reward_from"]
    config.segment_models_from = ""
    config.sft_steps = 300
    config.sft_learning_rate = 1e-3
    config.c1_weight = 1.0
    config.c2_weight = 1.0
    config.max_length = 1024
    config.prompt_length = 768
    config.max_new_tokens = 256
    config.eval_batch_size = 16
    if preset == "tiny":
        config.model.update(TINY_MODEL)
        config.max_length = 160
        config.prompt_length = 128
        config.max_new_tokens = 32
        config.batch_size = 8
        config.eval_batch_size = 8
        config.num_eval_prompts = 8
        config.sft_steps = 4
        config.num_steps = 8
        config.eval_every = 8
        config.log_every = 1
        config.checkpoint_every = 100
        config.optimizer.warmup_steps = 0
        config.optimizer.learning_rate = 1e-2
        config.sft_learning_rate = 1e-2
        config.kl_coef = 0.01
    if preset == "small":
        config.model.update(SMALL_MODEL)
        config.max_length = 480
        config.prompt_length = 384
        config.max_new_tokens = 96
        config.batch_size = 16
        config.num_eval_prompts = 32
        config.sft_steps = 100
        config.num_steps = 40
        config.eval_every = 20
        config.log_every = 5
        config.optimizer.warmup_steps = 5
        config.optimizer.learning_rate = 1e-4
    return config
